"""The artifact set: every file, the index, the evaluation, skipping when up to date."""

import json

import pytest

from models import build, evaluate


def test_index_lists_every_artifact_and_the_evaluation(tiny_artifacts):
    index = json.loads((tiny_artifacts / "index.json").read_text())
    names = [a["name"] for a in index["artifacts"]]
    assert names == ["mnist-lenet5-wide", "mnist-lenet5-wide-parity-k2-sum", "mnist-lenet5-wide-parity-k3-sum",
                     "mnist-lenet5-wide-parity-k4-sum", "mnist-lenet5-wide-parity-k2-concat",
                     "mnist-lenet5-wide-parity-k4-concat", "mnist-lenet5-wide-backup"]
    for a in index["artifacts"]:
        assert (tiny_artifacts / a["onnx"]).is_file() and (tiny_artifacts / a["manifest"]).is_file()
        assert a["metrics"]["onnx_max_abs_diff"] < 1e-3
    assert {(a["k"], a["encoder"]) for a in index["artifacts"] if a["role"] == "parity"} == \
        {(2, "sum"), (3, "sum"), (4, "sum"), (2, "concat"), (4, "concat")}
    evaluation = json.loads((tiny_artifacts / "evaluation.json").read_text())
    assert evaluation == index["evaluation"]
    (record,) = evaluation
    assert {"dataset", "arch", "base_top1", "backup_top1", "parity"} <= set(record)
    assert (record["dataset"], record["arch"], record["coder"]) == ("mnist", "lenet5-wide", "coding_ext")
    assert len(record["parity"]) == 5
    for p in record["parity"]:
        assert {"k", "encoder", "degraded_top1", "degraded_top5", "agreement"} <= set(p)
        assert 0.0 <= p["degraded_top1"] <= p["degraded_top5"] <= 1.0
        # One grouping of the 1,000 test examples: every example erased once (k = 3 leaves one out).
        assert p["decoded"] == (1000 // p["k"]) * p["k"]
    assert record["default_top1"] == pytest.approx(0.1)
    assert "total" in index["timing_s"]


def test_a_second_build_is_skipped_when_up_to_date(tiny_artifacts):
    logged = []
    before = (tiny_artifacts / "index.json").read_text()
    build.build(tiny_artifacts, build.TINY, progress=False, log=logged.append)
    assert len(logged) == 1 and "up to date" in logged[0]
    assert (tiny_artifacts / "index.json").read_text() == before


def test_a_missing_file_or_another_plan_is_not_up_to_date(tiny_artifacts, tmp_path):
    key = build.build_key(build.TINY)
    assert build.up_to_date(tiny_artifacts, key)
    assert not build.up_to_date(tiny_artifacts, build.build_key(build.DEFAULT))
    assert build.build_key(build.DEFAULT) != key
    assert not build.up_to_date(tmp_path, key)


def test_evaluation_of_the_artifacts_matches_the_index(tiny_artifacts):
    (record,) = evaluate.evaluate_dir(tiny_artifacts, groupings=1, threads=1)
    index = json.loads((tiny_artifacts / "index.json").read_text())
    assert record == index["evaluation"][0]
    table = evaluate.format_table(record)
    assert "sum" in table and "concat" in table and "default output" in table
    assert len([line for line in table.splitlines() if line.strip()[:1].isdigit()]) == 3
