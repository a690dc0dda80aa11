"""The calibration: a short run on the testbed writes a file the runner accepts; the fit recovers a known model."""

import json
import pathlib
import random
import subprocess
import sys


import pytest

from deploy.network import calibrate, sandbox
from deploy.network.background import BackgroundModel
from deploy.network.shuffle import TransferSpan
from deploy.runner import config

REPO = pathlib.Path(__file__).resolve().parents[2]


def synthetic(mean_ms, stall_p, stall_ms, n=20000, seed=1):
    """Raw measurements as ``measure`` returns them, from a known model (host 0 always busy)."""
    rng = random.Random(seed)
    base = 1.0
    idle = [(0, 0.001 * i, base + rng.uniform(-0.2, 0.2)) for i in range(500)]
    busy = [(0, 10 + 0.001 * i, base + rng.expovariate(1 / mean_ms) + (stall_ms if rng.random() < stall_p else 0))
            for i in range(n)]
    untouched = [(1, 10 + 0.001 * i, base) for i in range(100)]
    return {"samples": idle + busy + untouched, "lost": 0, "idle": (0, 1), "background": (10, 100),
            "timeline": [TransferSpan(0, 2, 5_000_000, 9.0, 11.0 + 0.001 * n), TransferSpan(2, 0, 5_000_000, 50, 51)],
            "failed_shuffles": 0}


def test_fit_recovers_a_known_mixture():
    bg, ev = calibrate.fit(synthetic(4.0, 0.01, 200.0), (3_125_000, 6_250_000))
    assert bg["delay"] == {"kind": "exponential", "params": {"mean_ms": pytest.approx(4.0, rel=0.1)}}
    assert bg["stall_probability"] == pytest.approx(0.01, rel=0.3)
    assert bg["stall_ms"] == pytest.approx(200.0, rel=0.05)
    assert bg["size_mb"] == [3.125, 6.25]
    assert bg["bandwidth_mbps"] == pytest.approx(2 * 5e6 * 8 / 1e6 / 1.0, rel=0.6)
    assert ev["probes"]["overlapping"] == 20000 and ev["probes"]["idle"] == 500
    for q in ("p50", "p99", "p99.9"):
        assert ev["extra_ms_fitted_model"][q] == pytest.approx(ev["extra_ms_measured"][q], rel=0.25, abs=1.0)
    # What the runner's emulated network accepts.
    assert BackgroundModel.from_config(bg).stall_ms == bg["stall_ms"]


def test_fit_without_stalls_is_a_pure_exponential():
    bg, _ = calibrate.fit(synthetic(3.0, 0.0, 0.0), (1, 2))
    assert bg["stall_probability"] < 0.002
    assert bg["delay"]["params"]["mean_ms"] == pytest.approx(3.0, rel=0.15)


def test_too_few_probes_is_a_clear_failure():
    raw = synthetic(3.0, 0.0, 0.0, n=5)
    with pytest.raises(calibrate.cli.Failure, match="overlapped a transfer; run longer"):
        calibrate.fit(raw, (1, 2))


def test_bad_flags_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "deploy.network.calibrate", "--instances", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--instances" in proc.stderr


@pytest.mark.slow
def test_a_short_calibration_writes_a_file_the_runner_accepts(tmp_path):
    try:
        sandbox.mode()
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, "-m", "deploy.network.calibrate", "--instances", "3", "--shuffles", "1",
                           "--idle-s", "3", "--duration-s", "12", "--probe-rate", "30", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    cal = data["calibration"]
    assert cal["command"].startswith("python -m deploy.network.calibrate --instances 3")
    assert "--out" in cal["command"] and str(out) not in cal["command"].replace(f"--out {out}", "")
    assert cal["machine"]["cpus"] >= 1 and cal["date"][:2] == "20"
    assert cal["testbed"]["rate_mbit"] == 50.0 and cal["testbed"]["queue_ms"] == 10.0
    assert cal["probes"]["overlapping"] >= 20 and cal["transfers"]["completed"] >= 1
    background = config.load_calibration(out)
    assert 1 < background["bandwidth_mbps"] <= 100  # two directions of one 50 Mbit/s link pair
    assert background["size_mb"] == [3.125, 6.25]
    # The runner's config takes it as its emulated background model.
    sweep = config.parse({"experiment_id": "t", "redundancy_modes": ["equal"], "send_rates": [1],
                          "num_queries": 1}).with_overrides(background_model=background)
    assert BackgroundModel.from_config(sweep.runs()[0].background_model).stall_probability == \
        background["stall_probability"]
