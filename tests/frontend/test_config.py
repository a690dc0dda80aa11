"""Start-up checks of the frontend's models (issue 13 item 4): refused with one line."""

import dataclasses
import subprocess
import sys

import pytest

from services.common import manifest as manifest_mod
from services.common.cli import UsageError
from services.frontend.config import parse_config

pytestmark = pytest.mark.timeout(60)


def variant(path, out_dir, name, **changes):
    """A copy of the manifest at ``path`` with ``changes``, saved as ``name``.json."""
    m = manifest_mod.load(path)
    m = dataclasses.replace(m, name=name, **changes)
    target = out_dir / f"{name}.json"
    m.save(target)
    return str(target)


def argv(models, *extra):
    return ["--model", str(models["base"]), "--instances", "data=h:1,parity=h:2", *map(str, extra)]


def test_matching_models_are_accepted(models):
    cfg = parse_config(argv(models, "--mode", "coded", "--parity-model", models["parity"]))
    assert cfg.encoder == "sum" and cfg.k == 2


def test_encoder_differing_from_the_parity_models_is_refused(models):
    with pytest.raises(UsageError, match=r"--encoder concat differs from the encoder the parity model "
                                          r"'lin-parity-k2-sum' was trained with \(sum\)"):
        parse_config(argv(models, "--mode", "coded", "--parity-model", models["parity"], "--encoder", "concat"))


def test_concat_that_cannot_tile_the_input_is_refused(models, tmp_path):
    parity = variant(models["parity"], tmp_path, "lin-parity-k2-concat", encoder="concat")
    with pytest.raises(UsageError, match=r"concat encoder needs per-example inputs \(C, H, W\); "
                                          r"model 'lin' takes \[4\]"):
        parse_config(argv(models, "--mode", "coded", "--parity-model", parity))
    odd = variant(models["base"], tmp_path, "img", input_shape=(1, 5, 5))
    odd_parity = variant(models["parity"], tmp_path, "img-parity", encoder="concat", base_model="img")
    with pytest.raises(UsageError, match=r"k=2 needs an even width; model 'img' takes \[1, 5, 5\]"):
        parse_config(["--model", odd, "--instances", "data=h:1", "--mode", "coded", "--parity-model", odd_parity])
    even = variant(models["base"], tmp_path, "img2", input_shape=(1, 6, 4))
    even_parity = variant(models["parity"], tmp_path, "img2-parity", encoder="concat", base_model="img2")
    cfg = parse_config(["--model", even, "--instances", "data=h:1", "--mode", "coded", "--parity-model", even_parity])
    assert cfg.encoder == "concat"


def test_parity_of_another_base_model_is_refused(models, tmp_path):
    parity = variant(models["parity"], tmp_path, "other-parity", base_model="other")
    with pytest.raises(UsageError, match="trained for base model 'other', not 'lin'"):
        parse_config(argv(models, "--mode", "coded", "--parity-model", parity))


def test_parity_or_backup_output_shape_must_match_the_base(models, tmp_path):
    parity = variant(models["parity"], tmp_path, "wide-parity", output_shape=(5,))
    with pytest.raises(UsageError, match=r"outputs shape \[5\], but the base model 'lin' outputs \[3\]"):
        parse_config(argv(models, "--mode", "coded", "--parity-model", parity))
    backup = variant(models["backup"], tmp_path, "wide-backup", output_shape=(2,))
    with pytest.raises(UsageError, match=r"--backup-model 'wide-backup' outputs shape \[2\]"):
        parse_config(argv(models, "--mode", "cheap", "--backup-model", backup))


def test_cli_refuses_a_mismatched_encoder_in_one_line(models):
    proc = subprocess.run([sys.executable, "-m", "services.frontend", *argv(
        models, "--mode", "coded", "--parity-model", models["parity"], "--encoder", "concat")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "differs from the encoder the parity model" in lines[0], proc.stderr


def test_coding_pool_buffers_flag(models):
    assert parse_config(argv(models)).coding_pool_buffers == 32
    assert parse_config(argv(models, "--coding-pool-buffers", 0)).coding_pool_buffers == 0
    with pytest.raises(UsageError, match="--coding-pool-buffers must be >= 0"):
        parse_config(argv(models, "--coding-pool-buffers", -1))


def test_two_calls_in_flight_per_instance_by_default(models):
    assert parse_config(argv(models)).max_in_flight == 2
    assert parse_config(argv(models, "--max-in-flight", 1)).max_in_flight == 1
    with pytest.raises(UsageError, match="--max-in-flight"):
        parse_config(argv(models, "--max-in-flight", 0))


def test_help_shows_each_default_once():
    from services.frontend.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: )" not in text
    assert "coding group size (default: the parity manifest's k, else 2)" in text
    assert "queries per batch (default: 1)" in text
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = (formatter._get_help_string(action) or "").replace("%(default)s", str(action.default))
        assert shown.count("(default") + shown.count("; default") <= 1, (action.option_strings, shown)
