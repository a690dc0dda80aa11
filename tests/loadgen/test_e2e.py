"""The load generator against a real deployment: real model-server and
frontend processes (coded mode, k = 2, tiny linear ONNX models whose parity
model reconstructs exactly), one data instance slowed so that some answers
are reconstructions. Checks the records, accuracy by source, and the
frontend's records read back through ``loadgen.stats``."""

import json
import subprocess
import sys

import numpy as np
import pytest

from services.common.procs import ServiceProcess
from tests.frontend.models import W, write_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_loadgen_against_a_real_coded_deployment(tmp_path):
    models = write_deployment(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = np.argmax(x @ W, axis=1)
    np.savez(tmp_path / "inputs.npz", X=x, y=y)
    records_dir = tmp_path / "frontend-records"
    out = tmp_path / "run"
    procs = []
    try:
        def server(model, role, name, *extra):
            p = ServiceProcess.python_module("services.model_server", [
                "--model", model, "--role", role, "--instance-id", name, "--port", "0", *extra], name=name)
            procs.append(p)
            return p
        fast = server(models["base"], "data", "data-0")
        slow = server(models["base"], "data", "data-1", "--delay-dist", "constant",
                      "--delay-params", "value_ms=150")
        parity = server(models["parity"], "parity", "parity-0")
        instances = f"data={fast.address},data={slow.address},parity={parity.address}"
        frontend = ServiceProcess.python_module("services.frontend", [
            "--mode", "coded", "--model", models["base"], "--parity-model", models["parity"],
            "--instances", instances, "--host", "127.0.0.1", "--port", "0",
            # the paper's rule: every decode answers, so decodes == reconstructed answers below
            "--decode-policy", "immediate",
            "--records-dir", records_dir], name="frontend")
        procs.append(frontend)
        proc = subprocess.run([sys.executable, "-m", "loadgen", "--target", frontend.address,
                               "--rate", "20", "--num-queries", "60", "--warmup-queries", "6",
                               "--inputs", str(tmp_path / "inputs.npz"), "--out", str(out),
                               "--no-progress", "--run-id", "e2e"],
                              capture_output=True, text=True, timeout=180)
        assert frontend.stop() == 0  # graceful: records flushed
    finally:
        for p in reversed(procs):
            p.stop()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["redundancy_mode"] == "coded" and summary["meta"]["k"] == 2
    assert summary["num_ok"] == summary["num_sent"] == 60, summary["errors"]
    by = summary["by_source"]
    assert by["original"]["num"] > 0 and by["reconstructed"]["num"] > 0
    assert by["original"]["num"] + by["reconstructed"]["num"] == 60
    # Linear models: originals and exact reconstructions predict the true label.
    assert by["original"]["accuracy"] == 1.0 and by["reconstructed"]["accuracy"] == 1.0
    stats = subprocess.run([sys.executable, "-m", "loadgen.stats", str(out), "--frontend-records",
                            str(records_dir), "--write-summary"], capture_output=True, text=True,
                           timeout=60)
    assert stats.returncode == 0, stats.stderr
    for title in ("E2E_LATENCY (ms)", "FRONTEND_LATENCY (ms)", "ENCODING_LATENCY (us)",
                  "DECODING_LATENCY (us)"):
        assert f"{title}\nNUM   MED   MEAN  P99     P99.5   P99.9\n" in stats.stdout
    frontend = json.loads((out / "summary.json").read_text())["frontend"]
    assert frontend["frontend_latency_ms"]["num"] == 66  # warm-up included: the frontend cannot tell
    assert frontend["encoding_latency_us"]["num"] >= 30
    # Batch size 1: one decode per reconstructed answer, warm-up included.
    from loadgen.records import read_csv
    reconstructed = sum(r.source == "reconstructed" for r in read_csv(out / "records.csv"))
    assert frontend["decoding_latency_us"]["num"] == reconstructed
    # The frontend saw the load generator's request ids.
    seen = {json.loads(line).get("request_id")
            for line in (records_dir / "queries.jsonl").read_text().splitlines()}
    assert {f"e2e-0-{i}" for i in range(66)} <= seen
