"""The reliability benchmarks' command lines: one-line mistakes (exit 2) and
a missing artifacts folder (exit 1), before anything is started."""

import importlib

import pytest

MODULES = ("chaos", "fuzz", "overload", "soak")


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("argv, code, text", [
    (["--bogus"], 2, "error: unrecognized arguments: --bogus"),
    (["--artifacts", "/nonexistent-artifacts"], 1,
     "error: no models in /nonexistent-artifacts/; build them with `make models`"),
])
def test_mistakes_are_one_line(name, argv, code, text, capsys):
    module = importlib.import_module(f"deploy.reliability.{name}")
    assert module.main(argv) == code
    err = capsys.readouterr().err
    assert err == f"python -m deploy.reliability.{name}: {text}\n"


@pytest.mark.parametrize("name, argv, text", [
    ("chaos", ["--rate", "0"], "--rate must be > 0"),
    ("chaos", ["--k", "3", "--num-models", "2"], "need k >= 2 and --num-models >= k"),
    ("fuzz", ["--cases", "3"], "--cases must be >= 10"),
    ("overload", ["--compute-ms", "0"], "--compute-ms must be > 0"),
    ("soak", ["--duration-s", "10"], "--duration-s must exceed --warmup-s by at least two samples"),
])
def test_flag_checks_are_usage_errors(name, argv, text, capsys):
    module = importlib.import_module(f"deploy.reliability.{name}")
    assert module.main(argv) == 2
    assert capsys.readouterr().err == f"python -m deploy.reliability.{name}: error: {text}\n"


def test_help_shows_each_default_once(capsys):
    from deploy.reliability import chaos

    with pytest.raises(SystemExit):
        chaos.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 30.0)" in text and "(default: None)" not in text
