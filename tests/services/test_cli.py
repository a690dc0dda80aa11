"""services.common.cli: the exit convention and --help of every entry point."""

import pytest

from services.common import cli


def _parser():
    p = cli.ArgumentParser(prog="python -m demo", description="demo")
    p.add_argument("--rate", type=float, default=2.5, help="queries per second")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--name", default=None, help="optional name")
    p.add_argument("--no-build", dest="build", action="store_false", help="do not build")
    p.add_argument("--verbose", action="store_true", help="say more")
    return p


def test_help_shows_each_default_once_and_none_for_flags():
    text = _parser().format_help()
    assert "queries per second (default: 2.5)" in text
    assert "batch size (default 64)" in text and "(default 64) (default" not in text
    assert "optional name" in text and "default: None" not in text
    assert "do not build" in text and "default: True" not in text
    assert "say more" in text and "default: False" not in text


@pytest.mark.parametrize("argv,expected_rc,expected_err", [
    (["--rate", "x"], 2, "python -m demo: error: argument --rate: invalid float value: 'x'\n"),
    (["--bogus"], 2, "python -m demo: error: unrecognized arguments: --bogus\n"),
    (["--rate", "-1"], 2, "python -m demo: error: --rate must be > 0\n"),
    (["--name", "missing"], 1, "python -m demo: error: no such file: missing\n"),
    (["--name", "fail"], 1, "python -m demo: error: refused to start: port taken\n"),
    (["--name", "ctrl-c"], 130, "python -m demo: interrupted\n"),
    (["--rate", "3"], 0, ""),
    (["--name", "seven"], 7, ""),
])
def test_run_main_exit_convention(argv, expected_rc, expected_err, capsys, monkeypatch):
    monkeypatch.delenv("PARM_DEBUG", raising=False)

    def main(args):
        a = _parser().parse_args(args)
        if a.rate <= 0:
            raise cli.UsageError("--rate must be > 0")
        if a.name == "missing":
            raise FileNotFoundError("no such file: missing")
        if a.name == "fail":
            raise cli.Failure("refused to start:\n  port taken")
        if a.name == "ctrl-c":
            raise KeyboardInterrupt
        return 7 if a.name == "seven" else None

    assert cli.run_main(main, argv, prog="python -m demo") == expected_rc
    assert capsys.readouterr().err == expected_err


def test_bugs_keep_their_traceback_and_debug_reraises(monkeypatch):
    def buggy(argv):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        cli.run_main(buggy, [], prog="p")
    monkeypatch.setenv("PARM_DEBUG", "1")
    with pytest.raises(cli.UsageError):
        cli.run_main(lambda argv: _parser().parse_args(["--bogus"]), [], prog="p")


@pytest.mark.parametrize("kind, bounds, text, expected", [
    (int, {"at_least": 1}, "0", "argument --n: must be >= 1, got 0"),
    (int, {"at_least": 1}, "x", "argument --n: not an integer: 'x'"),
    (float, {"above": 0}, "0", "argument --n: must be > 0, got 0"),
    (float, {"above": 0}, "nan", "argument --n: not a number: 'nan'"),
    (int, {"at_least": 0, "at_most": 65535}, "70000", "argument --n: must be <= 65535, got 70000"),
])
def test_number_rejects_out_of_bounds_in_one_line(kind, bounds, text, expected):
    p = cli.ArgumentParser(prog="demo")
    p.add_argument("--n", type=cli.number(kind, **bounds))
    with pytest.raises(cli.UsageError) as info:
        p.parse_args(["--n", text])
    assert str(info.value) == expected


def test_number_and_port_accept_values_in_bounds():
    p = cli.ArgumentParser(prog="demo")
    p.add_argument("--n", type=cli.number(int, at_least=1))
    p.add_argument("--port", type=cli.PORT)
    a = p.parse_args(["--n", "3", "--port", "0"])
    assert (a.n, a.port) == (3, 0)
