"""The seed study: one build per seed, the spread of every model's top-1 over the seeds."""

import json

import pytest

from models import build, seeds


def _index(base_top1, parity, backup_top1=0.9):
    return {"evaluation": [{"base_top1": base_top1, "backup": "b", "backup_top1": backup_top1,
                            "parity": [{"k": k, "encoder": e, "degraded_top1": v} for (k, e), v in parity.items()]}]}


def test_summary_gives_values_and_gaps_to_the_base_of_the_same_seed():
    indexes = [_index(0.98, {(2, "sum"): 0.95, (2, "concat"): 0.97}, 0.91),
               _index(0.99, {(2, "sum"): 0.93, (2, "concat"): 0.985}, 0.93)]
    rows = {row["model"]: row for row in seeds.summarize(indexes)}
    assert list(rows) == ["base", "parity k=2 concat", "parity k=2 sum", "backup"]
    assert rows["base"]["values"] == [0.98, 0.99] and rows["base"]["gaps"] is None
    assert rows["parity k=2 sum"]["gaps"] == pytest.approx([-0.03, -0.06])
    assert rows["parity k=2 concat"]["gaps"] == pytest.approx([-0.01, -0.005])
    assert rows["backup"]["values"] == [0.91, 0.93]
    table = seeds.format_table(seeds.summarize(indexes), [0, 1])
    assert "| base | 98.5 (98.0..99.0) | - | 98.0 / 99.0 |" in table
    assert "| parity k=2 sum | 94.0 (93.0..95.0) | -4.5 (-6.0..-3.0) | 95.0 / 93.0 |" in table


def test_with_seed_sets_every_role_and_keeps_the_split():
    plan = build.with_seed(build.DEFAULT, 7)
    assert (plan.base.seed, plan.parity.seed, plan.backup.seed) == (7, 7, 7)
    assert plan.split_seed == build.DEFAULT.split_seed
    assert build.with_seed(build.DEFAULT, 0) == build.DEFAULT
    assert build.build_key(plan) != build.build_key(build.DEFAULT)


def test_seed_study_of_tiny_builds_reuses_an_up_to_date_build(tiny_artifacts, tmp_path, capsys):
    # The session's tiny build is seed 0: copied in, it is not rebuilt.
    import shutil
    shutil.copytree(tiny_artifacts, tmp_path / "seed-0")
    before = (tmp_path / "seed-0" / "index.json").read_text()
    assert seeds.main(["--seeds", "0", "1", "--out", str(tmp_path), "--tiny", "--jobs", "1", "--no-progress"]) == 0
    assert (tmp_path / "seed-0" / "index.json").read_text() == before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["build_keys"]) == 2
    assert summary["build_keys"][0] == build.build_key(build.TINY)
    base = summary["rows"][0]
    assert base["model"] == "base" and len(base["values"]) == 2
    assert "| base |" in capsys.readouterr().out
