"""Command lines: --help for every flag, and bad input as one line on stderr, no traceback."""

import json
import pathlib
import subprocess
import sys

import pytest

from models import build, cli, evaluate, export, train

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line_error(capsys, main, argv, prog):
    try:
        rc = cli.run(main, argv, prog)
    except SystemExit as exc:   # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_wrong_dataset_name_is_one_line_from_the_real_command(tmp_path):
    proc = _run_module("models.train", "base", "--dataset", "imagenet-22k", "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'imagenet-22k'" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_missing_checkpoint_is_one_line_from_the_real_command(tmp_path):
    proc = _run_module("models.train", "parity", "--base", str(tmp_path / "nope.pt"), "--k", "2",
                       "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing checkpoint" in proc.stderr and "nope.pt" in proc.stderr


def test_mismatched_k_for_concat_is_one_line(capsys, tiny_artifacts, tmp_path):
    base = str(tiny_artifacts / "checkpoints" / "mnist-lenet5-wide.pt")
    err = _one_line_error(capsys, train.main, ["parity", "--base", base, "--k", "3", "--encoder", "concat",
                                               "--out", str(tmp_path / "p.pt")], "train")
    assert "concat" in err and "k=3" in err


@pytest.mark.parametrize("argv,needle", [
    (["parity", "--base", "b.pt", "--k", "two", "--out", "p.pt"], "invalid int value: 'two'"),
    (["parity", "--base", "b.pt", "--out", "p.pt"], "--k"),
    (["base", "--arch", "vgg99", "--out", "x.pt"], "'vgg99'"),
    (["base", "--epochs", "0", "--out", "x.pt"], "--epochs"),
    (["fine-tune"], "invalid choice: 'fine-tune'"),
])
def test_bad_train_arguments_are_one_line(capsys, argv, needle):
    assert needle in _one_line_error(capsys, train.main, argv, "train")


def test_parity_with_a_parity_checkpoint_as_base_is_one_line(capsys, tiny_artifacts, tmp_path):
    parity = str(tiny_artifacts / "checkpoints" / "mnist-lenet5-wide-parity-k2-sum.pt")
    err = _one_line_error(capsys, train.main, ["parity", "--base", parity, "--k", "2", "--out",
                                               str(tmp_path / "p.pt")], "train")
    assert "not a base model" in err


def test_evaluate_bad_input_is_one_line(capsys, tiny_artifacts, tmp_path):
    assert "no artifacts directory" in _one_line_error(capsys, evaluate.main, ["--artifacts", str(tmp_path / "x")],
                                                       "evaluate")
    assert "no base model manifest" in _one_line_error(capsys, evaluate.main, ["--artifacts", str(tmp_path)],
                                                       "evaluate")
    assert "k=5" in _one_line_error(capsys, evaluate.main, ["--artifacts", str(tiny_artifacts), "--k", "5"],
                                    "evaluate")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "m.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(capsys, evaluate.main, ["--artifacts", str(broken)], "evaluate")


def test_export_of_a_missing_checkpoint_is_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, export.main, ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)],
                          "export")
    assert "missing checkpoint" in err


def test_evaluate_command_writes_json_and_prints_the_table(capsys, tiny_artifacts, tmp_path):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--artifacts", str(tiny_artifacts), "--groupings", "1", "--k", "2",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mnist / lenet5-wide" in text and "default output" in text
    (record,) = json.loads(out.read_text())
    assert [(p["k"], p["encoder"]) for p in record["parity"]] == [(2, "concat"), (2, "sum")]


@pytest.mark.parametrize("main,argv,flags", [
    (train.main, ["base", "--help"], ["--dataset", "--arch", "--split-seed", "--no-augment", "--epochs", "--seed",
                                      "--threads", "--max-train", "--data-root", "--no-progress"]),
    (train.main, ["parity", "--help"], ["--base", "--k", "--encoder", "--groups-per-epoch", "--augment",
                                        "--val-groupings", "--lr", "--weight-decay"]),
    (train.main, ["backup", "--help"], ["--base", "--arch", "--out"]),
    (evaluate.main, ["--help"], ["--artifacts", "--json", "--k", "--groupings", "--threads"]),
    (build.main, ["--help"], ["--out", "--tiny", "--force", "--threads"]),
    (export.main, ["--help"], ["--checkpoint", "--out"]),
])
def test_help_documents_every_flag(capsys, main, argv, flags):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    shown = {word.strip(",[]") for word in text.split() if word.startswith("--")}
    assert set(flags) <= shown


@pytest.mark.parametrize("module", [train, evaluate, build, export])
def test_every_option_has_a_description(module):
    parsers = [module.build_parser()]
    for action in parsers[0]._actions:
        if isinstance(action.choices, dict):   # the subcommands of models.train
            parsers += list(action.choices.values())
    assert len(parsers) == (4 if module is train else 1)
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings:
                assert action.help, (parser.prog, action.option_strings)
