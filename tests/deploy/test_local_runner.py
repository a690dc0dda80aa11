"""``python -m deploy.runner.local`` end to end: real processes, tiny real models.

Every child the runner starts inherits ``PARM_TEST_MARK``; after the runner
exits — normally, on Ctrl-C, or after a failed step — no process carrying
the mark may be alive (the services run in their own sessions, so the
suite-wide child check alone would not see them).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.marks import assert_none_left, marked

pytestmark = pytest.mark.slow



def write_config(path, **changes):
    cfg = {
        "experiment_id": "tiny",
        "model": "default",
        "redundancy_modes": ["equal", "coded"],
        "num_models": 2,
        "ec_k_val": [2],
        "send_rates": [40],
        "num_queries": 80,
        "warmup_queries": 10,
        "background_traffic": [1],
        "network": "emulated",
        "emulation": {
            "compute": {"kind": "constant", "params": {"value_ms": 2}},
            "background": {"bandwidth_mbps": 4000, "size_mb": [32, 64], "stall_probability": 0.05,
                           "stall_ms": 150},
        },
    }
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


def runner(args, mark, **kwargs):
    env = dict(os.environ, PARM_TEST_MARK=mark, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "deploy.runner.local", *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_small_sweep_runs_reports_and_cleans_up(tmp_path, tiny_artifacts):
    mark = uuid.uuid4().hex
    cfg = write_config(tmp_path / "cfg.json")
    proc = runner([cfg, "--artifacts", tiny_artifacts, "--out", tmp_path / "results", "--no-build"], mark)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert_none_left(mark)
    root = tmp_path / "results" / "tiny"
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("mode_"))
    assert [r.name.split("-")[0] for r in runs] == ["mode_coded", "mode_equal"]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        # Every measured query answered, none lost.
        assert summary["overall"]["num"] == 80, summary["errors"]
        assert summary["background"]["kind"] == "emulated"
        assert summary["background"]["transfers"] >= 1
        # this machine's CPU during the load: every service ran on it
        cpu = summary["machine_cpu"]
        assert cpu["cores"] == os.cpu_count() and 0.0 < cpu["busy_pct"] <= 100.0 and cpu["seconds"] > 0
        rows = (run / "records.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + 90  # header + warm-up + measured
        # Every emulated transfer, with the instances it touched, in the frontend's time.
        spans = [json.loads(line) for line in (run / "shuffles.jsonl").read_text().splitlines()]
        assert len(spans) == summary["background"]["transfers"]
        received = [json.loads(line)["received_s"] for line in
                    (run / "frontend" / "queries.jsonl").read_text().splitlines() if '"query"' in line]
        for span in spans:
            assert len(span["src"]) == len(span["dst"]) == 1 and span["src"] != span["dst"]
            assert all(re.fullmatch(r"(data|parity)-\d", i) for i in span["src"] + span["dst"])
            assert min(received) - 30 < span["start_s"] < span["end_s"] < max(received) + 30
    coded = json.loads((root / [r.name for r in runs if r.name.startswith("mode_coded")][0]
                        / "summary.json").read_text())
    # A parity for every full group and every padded one (a group whose query was answered
    # before it stopped waiting needs none): how many depends on timing, the rule does not.
    coded_dir = next(r for r in runs if r.name.startswith("mode_coded"))
    groups = [json.loads(line) for line in (coded_dir / "frontend" / "groups.jsonl").read_text().splitlines()]
    assert len(groups) >= 45 and all(g["parity_batch_id"] is not None for g in groups if g["full"])
    assert all(g["padded"] == (g["parity_batch_id"] is not None) for g in groups if not g["full"])
    parities = sum(g["parity_batch_id"] is not None for g in groups)
    assert coded["frontend"]["encoding_us"]["num"] == parities >= 1
    report = (root / "report.md").read_text()
    assert "Comparison" in report and "E2E_LATENCY" in report
    assert "### This machine's CPU during the load" in report
    for png in (root / "plots").glob("*.png"):
        assert png.stat().st_size > 1000
    assert (root / "plots" / "latency_vs_rate.png").exists()
    assert "COMPARISON" in out


def test_ctrl_c_stops_everything(tmp_path, tiny_artifacts):
    mark = uuid.uuid4().hex
    cfg = write_config(tmp_path / "cfg.json", send_rates=[5], num_queries=2000)
    proc = runner([cfg, "--artifacts", tiny_artifacts, "--out", tmp_path / "results", "--no-build"], mark)
    # Wait until the deployment and its load are up, then interrupt.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(marked(mark)) < 6:
        time.sleep(0.2)
    if len(marked(mark)) < 6:
        proc.kill()
        pytest.fail(f"the deployment never came up: {proc.communicate()[1][-2000:]}")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert_none_left(mark)


def test_failed_start_stops_what_was_started(tmp_path, tiny_artifacts):
    mark = uuid.uuid4().hex
    # A parity manifest that exists but points at a missing ONNX file: the
    # registry and data instances start, the parity instance fails.
    broken = tmp_path / "artifacts"
    broken.mkdir()
    for src in os.listdir(tiny_artifacts):
        if src.endswith(".onnx") and "parity" in src:
            continue
        os.symlink(os.path.join(tiny_artifacts, src), broken / src)
    cfg = write_config(tmp_path / "cfg.json", redundancy_modes=["coded"])
    proc = runner([cfg, "--artifacts", broken, "--out", tmp_path / "results", "--no-build"], mark)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "parity" in err
    assert_none_left(mark)


def test_bad_config_is_one_line(tmp_path, tiny_artifacts):
    cfg = write_config(tmp_path / "cfg.json", redundancy_modes=["coded", "turbo"])
    proc = runner([cfg, "--artifacts", tiny_artifacts], uuid.uuid4().hex)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "redundancy_modes" in err


def test_missing_models_without_build_is_one_line(tmp_path):
    cfg = write_config(tmp_path / "cfg.json")
    proc = runner([cfg, "--artifacts", tmp_path / "empty", "--no-build"], uuid.uuid4().hex)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "make models" in err and err.strip().count("\n") == 0


def test_clipper_background_runs_a_second_deployment(tmp_path, tiny_artifacts):
    mark = uuid.uuid4().hex
    cfg = write_config(tmp_path / "cfg.json", redundancy_modes=["coded"], background_traffic=["clipper"],
                       num_queries=60, emulation={"compute": {"kind": "constant", "params": {"value_ms": 2}},
                                                  "clipper": {"rate": 30, "num_models": 2}})
    proc = runner([cfg, "--artifacts", tiny_artifacts, "--out", tmp_path / "results", "--no-build"], mark)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_none_left(mark)
    run = next((tmp_path / "results" / "tiny").glob("mode_coded*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["overall"]["num"] == 60
    bg = summary["background"]
    assert bg["kind"] == "clipper" and bg["num_models"] == 2
    assert bg["answered"] >= 10  # the second deployment served its own load meanwhile
    # Its instances ran beside the main ones (logs of both deployments).
    assert (run / "logs" / "clipper" / "frontend.log").exists()


def test_serve_keeps_a_deployment_up_until_sigterm(tmp_path, tiny_artifacts):
    mark = uuid.uuid4().hex
    env = dict(os.environ, PARM_TEST_MARK=mark, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.runner.serve", "configs/serve.json", "--port", "0",
                             "--artifacts", tiny_artifacts, "--logs", str(tmp_path / "serve")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        address = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and address is None:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("frontend: "):
                address = line.split()[1]
        assert address, proc.stderr.read()[-2000:] if proc.poll() is not None else "no address printed"
        load = subprocess.run([sys.executable, "-m", "loadgen", "--target", address, "--rate", "50",
                               "--num-queries", "40", "--warmup-queries", "0", "--no-progress",
                               "--out", str(tmp_path / "load")], capture_output=True, text=True, timeout=120)
        assert load.returncode == 0, load.stderr
        summary = json.loads((tmp_path / "load" / "summary.json").read_text())
        assert summary["overall"]["num"] == 40
        assert proc.poll() is None  # still serving
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert_none_left(mark)
