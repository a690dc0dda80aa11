"""``python -m deploy.runner.local --tls-dir DIR``: a sweep with mutual TLS on every hop."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_local_sweep_runs_under_mutual_tls(tiny_artifacts, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "experiment_id": "tls", "model": "default", "redundancy_modes": ["coded"], "num_models": 2,
        "ec_k_val": [2], "send_rates": [40], "num_queries": 40, "warmup_queries": 4, "background_traffic": [1],
        "emulation": {"compute": {"kind": "constant", "params": {"value_ms": 2}},
                      "background": {"bandwidth_mbps": 4000, "size_mb": [32, 64], "stall_probability": 0.05,
                                     "stall_ms": 150}}}))
    proc = subprocess.run([sys.executable, "-m", "deploy.runner.local", str(cfg), "--artifacts", tiny_artifacts,
                           "--out", str(tmp_path / "results"), "--no-build", "--no-progress",
                           "--tls-dir", str(tmp_path / "certs")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "mutual TLS on every gRPC hop" in proc.stdout
    [run_dir] = (tmp_path / "results" / "tls").glob("mode_coded-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["num_sent"], summary["num_ok"], summary["errors"]) == (40, 40, {})
    for name in ("frontend", "data-0", "data-1", "parity-2", "loadgen-0"):
        assert "mutual TLS" in (run_dir / "logs" / f"{name}.log").read_text(), name
    records = (run_dir / "records.csv").read_text().splitlines()
    assert len(records) == 1 + 44 and all(",OK," in line for line in records[1:])
    assert (tmp_path / "certs" / "ca.pem").exists()
