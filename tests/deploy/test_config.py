"""Sweep configs: the shipped configs load, bad ones name the field."""

import json
import pathlib

import pytest

from deploy.runner import config

CONFIGS = sorted(pathlib.Path(__file__).resolve().parents[2].glob("configs/*.json"))
BASE = {"experiment_id": "t", "redundancy_modes": ["equal", "coded"], "send_rates": [10, 20], "num_queries": 50}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.runs(), path


def test_original_fields_keep_their_meaning():
    cfg = config.load(pathlib.Path(__file__).resolve().parents[2] / "configs/fig9a.json")
    runs = cfg.runs()
    assert cfg.num_models == (12,) and cfg.ec_k_val == (2,) and cfg.background_traffic == (4,)
    # 9 rates x 2 modes x 3 trials; modes adjacent so compared runs are close in time.
    assert len(runs) == 9 * 2 * 3
    assert [r.redundancy_mode for r in runs[:2]] == ["equal", "coded"]
    assert runs[0].send_rate == runs[1].send_rate == 150
    equal, coded = runs[0], runs[1]
    assert equal.num_instances == (18, 0, 0)
    assert coded.num_instances == (12, 6, 0)


def test_modes_instances():
    cfg = config.parse({**BASE, "redundancy_modes": ["none", "equal", "coded", "cheap", "hedged"],
                        "num_models": 4, "ec_k_val": [2, 4], "send_rates": [5]})
    by = {(r.redundancy_mode, r.k): r.num_instances for r in cfg.runs()}
    assert by[("equal", 2)] == (6, 0, 0)
    assert by[("coded", 4)] == (4, 1, 0)
    assert by[("cheap", 2)] == (4, 0, 2)
    assert by[("hedged", 4)] == (5, 0, 0)
    # none does not depend on k: it runs once.
    assert sum(1 for r in cfg.runs() if r.redundancy_mode == "none") == 1


def test_scalars_and_lists_are_equivalent():
    a = config.parse({**BASE, "num_models": 2, "batch_sizes": 1})
    b = config.parse({**BASE, "num_models": [2], "batch_sizes": [1]})
    assert [r.name for r in a.runs()] == [r.name for r in b.runs()]


@pytest.mark.parametrize("change, field", [
    ({"redundancy_modes": ["coded", "magic"]}, "redundancy_modes"),
    ({"queue_modes": ["fifo"]}, "queue_modes"),
    ({"send_rates": [10, -1]}, "send_rates"),
    ({"send_rates": []}, "send_rates"),
    ({"num_models": 3}, "num_models"),
    ({"ec_k_val": [1]}, "ec_k_val"),
    ({"batch_sizes": ["4"]}, "batch_sizes"),
    ({"background_traffic": [-2]}, "background_traffic"),
    ({"background_traffic": ["storm"]}, "background_traffic"),
    ({"num_trials": 0}, "num_trials"),
    ({"encoder": "xor"}, "encoder"),
    ({"encoder": "concat", "ec_k_val": [3], "num_models": 3}, "ec_k_val"),
    ({"network": "wifi"}, "network"),
    ({"experiment_id": "a b"}, "experiment_id"),
    ({"emulation": {"compute": {"kind": "zipf"}}}, "emulation.compute"),
    ({"emulation": {"background": {"stall_probability": 2}}}, "emulation.background.stall_probability"),
    ({"emulation": {"background": {"size_mb": [256, 128]}}}, "emulation.background.size_mb"),
    ({"emulation": {"background": {"rto": 1}}}, "emulation.background"),
    ({"typo_field": 1}, "typo_field"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(config.ConfigError, match=field.replace(".", r"\.")):
        config.parse({**BASE, **change})


def test_missing_required_field():
    data = dict(BASE)
    del data["send_rates"]
    with pytest.raises(config.ConfigError, match="'send_rates' is required"):
        config.parse(data)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        config.load(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(BASE))
    assert config.load(ok).experiment_id == "t"
