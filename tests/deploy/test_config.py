"""Sweep configs: the shipped configs load, bad ones name the field."""

import json
import pathlib

import pytest

from deploy.runner import config

# Every sweep config (the calibration file beside them is not one: tested below).
CONFIGS = sorted(p for p in pathlib.Path(__file__).resolve().parents[2].glob("configs/*.json")
                 if p.name != config.CALIBRATION_PATH.name)
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


def test_decode_policies_sweep_coded_runs_only_and_name_them():
    cfg = config.parse({**BASE, "send_rates": [10], "decode_policy": ["immediate", "late"]})
    runs = cfg.runs()
    assert [(r.redundancy_mode, r.decode_policy) for r in runs] == [
        ("equal", None), ("coded", "immediate"), ("coded", "late")]
    assert "-dp_late-" in runs[2].name and "-dp_" not in runs[0].name
    assert len({r.name for r in runs}) == 3


def test_decode_policy_reaches_the_frontend_only_when_set():
    from deploy.runner.deployment import Models, frontend_args

    models = Models(base="b.json", parity="p.json", backup=None)
    plain, late = config.parse({**BASE, "send_rates": [10]}), config.parse(
        {**BASE, "send_rates": [10], "decode_policy": "late"})
    args = lambda run: frontend_args(run, models, "redis://x", "ns", "/r", 0, "127.0.0.1")
    assert "--decode-policy" not in args(plain.runs()[1])
    a = args(late.runs()[1])
    assert a[a.index("--decode-policy") + 1] == "late"
    cheap = config.parse({**BASE, "send_rates": [10], "redundancy_modes": ["none", "cheap"],
                          "decode_policy": ["immediate", "late"]})
    assert [(r.redundancy_mode, r.decode_policy) for r in cheap.runs()] == [
        ("none", None), ("cheap", "immediate"), ("cheap", "late")]


def test_partial_groups_sweep_coded_runs_only_and_reach_the_frontend():
    from deploy.runner.deployment import Models, frontend_args

    cfg = config.parse({**BASE, "send_rates": [10], "decode_policy": "late", "partial_groups": ["pad", "uncoded"]})
    runs = cfg.runs()
    assert [(r.redundancy_mode, r.partial_groups) for r in runs] == [
        ("equal", None), ("coded", "pad"), ("coded", "uncoded")]
    assert runs[1].name.endswith("-dp_late-pg_pad-it_0") and "-pg_" not in runs[0].name
    models = Models(base="b.json", parity="p.json", backup=None)
    args = lambda run: frontend_args(run, models, "redis://x", "ns", "/r", 0, "127.0.0.1")
    assert "--partial-groups" not in args(runs[0])
    a = args(runs[2])
    assert a[a.index("--partial-groups") + 1] == "uncoded"
    plain = config.parse({**BASE, "send_rates": [10]}).runs()
    assert all(r.partial_groups is None and "--partial-groups" not in args(r) for r in plain)
    with pytest.raises(config.ConfigError, match="partial_groups"):
        config.parse({**BASE, "partial_groups": ["sometimes"]})


def test_max_in_flight_sweeps_every_mode_and_reaches_the_frontend_only_when_set():
    from deploy.runner.deployment import Models, frontend_args

    cfg = config.parse({**BASE, "send_rates": [10], "max_in_flight": [1, 2]})
    runs = cfg.runs()
    assert [(r.redundancy_mode, r.max_in_flight) for r in runs] == [
        ("equal", 1), ("coded", 1), ("equal", 2), ("coded", 2)]
    assert runs[3].name.endswith("-mif_2-it_0") and len({r.name for r in runs}) == 4
    models = Models(base="b.json", parity="p.json", backup=None)
    args = lambda run: frontend_args(run, models, "redis://x", "ns", "/r", 0, "127.0.0.1")
    assert [args(r)[args(r).index("--max-in-flight") + 1] for r in runs] == ["1", "1", "2", "2"]
    plain = config.parse({**BASE, "send_rates": [10]}).runs()
    assert all(r.max_in_flight is None and "--max-in-flight" not in args(r) and "-mif_" not in r.name
               for r in plain)
    for bad in ([0], ["2"], [], True):
        with pytest.raises(config.ConfigError, match="max_in_flight"):
            config.parse({**BASE, "max_in_flight": bad})


@pytest.mark.parametrize("bad", [["eager"], [], "sometimes", [1]])
def test_bad_decode_policies_name_the_field(bad):
    with pytest.raises(config.ConfigError, match="decode_policy"):
        config.parse({**BASE, "decode_policy": bad})


def test_network_defaults_to_emulated_and_background_to_the_calibration():
    cfg = config.parse(BASE)
    assert cfg.network == "emulated"  # configs/local.json asks for "auto"
    fitted = json.loads(config.CALIBRATION_PATH.read_text())
    assert cfg.background_model == config.load_calibration(config.CALIBRATION_PATH)
    assert cfg.background_model["stall_probability"] == pytest.approx(fitted["background"]["stall_probability"])
    assert cfg.background_model["delay"] == fitted["background"]["delay"]
    # The file says what produced it.
    assert {"command", "date", "machine"} <= set(fitted["calibration"])
    # A config's own values still win over the defaults.
    own = config.parse({**BASE, "emulation": {"background": {"stall_ms": 123}}})
    assert own.background_model["stall_ms"] == 123.0
    assert own.background_model["bandwidth_mbps"] == cfg.background_model["bandwidth_mbps"]


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"background": 3}', "'background' object"),
    ('{"background": {"stall_ms": 1}}', "lacks"),
    ('{"background": {"bandwidth_mbps": 1, "size_mb": [1, 2], "delay": {"kind": "exponential"}, '
     '"stall_probability": 7, "stall_ms": 1}}', "stall_probability"),
])
def test_bad_calibration_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(config.ConfigError, match=message):
        config.load_calibration(path)


def test_bare_config_names_resolve_to_configs():
    from deploy.runner.local import resolve_config_path

    assert resolve_config_path("fig9a-local") == str(config.CALIBRATION_PATH.parent / "fig9a-local.json")
    assert resolve_config_path("configs/local.json") == "configs/local.json"
    assert resolve_config_path("no-such-config") == "no-such-config"


def test_local_json_keeps_the_testbed_parameters_and_runs_three_trials():
    cfg = config.load(config.CALIBRATION_PATH.parent / "local.json")
    assert cfg.num_trials == 3 and cfg.network == "auto" and cfg.background_traffic == (2,)
    assert cfg.compute == {"kind": "lognormal", "params": {"median_ms": 8.0, "sigma": 0.25}}
    assert cfg.num_models == (4,) and cfg.redundancy_modes == ("equal", "coded") and cfg.decode_policies == ("late",)
    both = config.load(config.CALIBRATION_PATH.parent / "decode-policy.json")
    assert both.decode_policies == ("immediate", "late") and both.num_trials == 1
    assert {k: v for k, v in vars(both).items() if k not in ("experiment_id", "description", "decode_policies",
                                                               "num_trials", "source_path")} == \
        {k: v for k, v in vars(cfg).items() if k not in ("experiment_id", "description", "decode_policies",
                                                          "num_trials", "source_path")}
    fig = config.load(config.CALIBRATION_PATH.parent / "fig9a-local.json")
    coded = [r for r in fig.runs() if r.redundancy_mode == "coded"][0]
    assert coded.num_instances == (12, 6, 0) and fig.background_traffic == (4,) and fig.network == "netns"


def test_without_the_calibration_file_only_an_emulated_background_needs_one(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CALIBRATION_PATH", tmp_path / "missing.json")
    assert config.parse(BASE).background_model is None  # e.g. an AWS node: real shuffles only
    with pytest.raises(config.ConfigError, match="missing.json is missing"):
        config.parse({**BASE, "emulation": {"background": {"stall_ms": 5}}})
    full = {"bandwidth_mbps": 50, "size_mb": [1, 2], "delay": {"kind": "exponential", "params": {"mean_ms": 2}},
            "stall_probability": 0.01, "stall_ms": 40}
    assert config.parse({**BASE, "emulation": {"background": full}}).background_model["stall_ms"] == 40.0


def test_network_choice_says_which_and_why(monkeypatch):
    from deploy.network import netns, sandbox
    from deploy.runner import local
    from services.common import cli

    monkeypatch.delenv(sandbox.INSIDE_ENV, raising=False)
    monkeypatch.setattr(sandbox, "mode", lambda: "userns")
    network, line = local.choose_network("auto")
    assert network == "netns" and line.startswith("network: the namespace testbed") and "\n" not in line
    assert local.choose_network("emulated")[0] == "emulated"
    assert local.choose_network("auto", agents="hosts.json")[0] == "hosts"

    def no_sandbox():
        raise sandbox.SandboxUnavailable("unprivileged user namespaces are not available here (EPERM)")

    def no_privileges():
        raise netns.TestbedUnavailable("needs root")

    monkeypatch.setattr(sandbox, "mode", no_sandbox)
    monkeypatch.setattr(netns, "require_netns", no_privileges)
    network, line = local.choose_network("auto")
    assert network == "emulated" and "cannot run here" in line and "EPERM" in line and "\n" not in line
    with pytest.raises(cli.Failure, match="NETWORK=emulated"):
        local.choose_network("netns")
    # Root where user namespaces are off: the testbed in this process.
    monkeypatch.setattr(netns, "require_netns", lambda: None)
    assert local.choose_network("auto")[0] == "netns"
    # Inside the sandbox it is the testbed, without a second banner.
    monkeypatch.setenv(sandbox.INSIDE_ENV, "1")
    assert local.choose_network("auto") == ("netns", "")
