"""``python -m loadgen`` as a real process against the fake frontend."""

import csv
import json
import subprocess
import sys

import pytest

from tests.loadgen.fake_frontend import Behaviour, FakeFrontend, default_behaviour, expected_predicted
from tests.loadgen.test_stats import type7

SOURCE_OF = {1: "original", 2: "reconstructed", 3: "backup", 4: "default"}


def loadgen(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "loadgen", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _read(out_dir):
    with open(out_dir / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out_dir / "summary.json").read_text())


def _check_summary_row(row, latencies):
    assert row["num"] == len(latencies)
    if not latencies:
        assert row["med"] is None
        return
    assert row["mean"] == pytest.approx(sum(latencies) / len(latencies), rel=1e-9)
    for key, q in (("med", 50), ("p99", 99), ("p995", 99.5), ("p999", 99.9)):
        assert row[key] == pytest.approx(type7(latencies, q), rel=1e-9), key


def test_run_writes_records_and_summary_that_match_the_server(fake_frontend, inputs_npz, tmp_path):
    out = tmp_path / "run"
    proc = loadgen("--target", fake_frontend.address, "--rate", 300, "--num-queries", 200,
                   "--warmup-queries", 20, "--inputs", inputs_npz, "--out", out, "--seed", 5,
                   "--run-id", "cli")
    assert proc.returncode == 0, proc.stderr
    assert "E2E_LATENCY (ms)\nNUM   MED   MEAN  P99     P99.5   P99.9\n" in proc.stdout
    assert "RESOURCE_EXHAUSTED" in proc.stdout
    rows, summary = _read(out)
    assert len(rows) == 220
    assert sum(r["warmup"] == "1" for r in rows) == 20
    # Every record agrees with what the fake frontend received and answered.
    assert set(fake_frontend.seen) == {r["request_id"] for r in rows}
    table = default_behaviour()
    for r in rows:
        label = int(r["label"])
        assert fake_frontend.seen[r["request_id"]] == label
        b = table[label]
        if b.error is not None:
            assert (r["status"], r["source"], r["predicted"]) == ("RESOURCE_EXHAUSTED", "", "-1")
        else:
            assert r["status"] == "OK"
            assert r["source"] == SOURCE_OF[b.source]
            assert int(r["predicted"]) == expected_predicted(label, b)
            assert float(r["latency_ms"]) >= b.delay_ms
            assert (r["batch_id"], r["group_id"]) == ("7", "3")
    # summary.json equals an independent computation over records.csv.
    measured = [r for r in rows if r["warmup"] == "0"]
    ok = [r for r in measured if r["status"] == "OK"]
    _check_summary_row(summary["overall"], [float(r["latency_ms"]) for r in ok])
    for source in ("original", "reconstructed", "backup", "default"):
        group = [r for r in ok if r["source"] == source]
        _check_summary_row(summary["by_source"][source], [float(r["latency_ms"]) for r in group])
        if group:
            acc = sum(r["predicted"] == r["label"] for r in group) / len(group)
            assert summary["by_source"][source]["accuracy"] == pytest.approx(acc)
    labels = [int(r["label"]) for r in measured]
    assert summary["by_source"]["reconstructed"]["num"] == labels.count(6) + labels.count(7)
    assert summary["by_source"]["reconstructed"]["accuracy"] == pytest.approx(
        labels.count(6) / (labels.count(6) + labels.count(7)))
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": labels.count(9)}
    assert summary["meta"]["redundancy_mode"] == "coded"
    assert summary["meta"]["spec"]["rate"] == 300
    assert summary["send_lag_ms"]["num"] == 200
    # The stats CLI reproduces the table from the files.
    stats = subprocess.run([sys.executable, "-m", "loadgen.stats", out], capture_output=True,
                           text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.splitlines()[:3] == proc.stdout.splitlines()[:3]


def test_deadline_is_per_query_and_reported_by_code(inputs_npz, tmp_path):
    table = default_behaviour()
    table[3] = Behaviour(delay_ms=3000.0)
    with FakeFrontend(table) as fe:
        proc = loadgen("--target", fe.address, "--rate", 100, "--num-queries", 40,
                       "--warmup-queries", 0, "--deadline-s", 0.5, "--inputs", inputs_npz,
                       "--out", tmp_path, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows, summary = _read(tmp_path)
    late = [r for r in rows if r["label"] == "3"]
    assert late and all(r["status"] == "DEADLINE_EXCEEDED" for r in late)
    assert all(400 <= float(r["latency_ms"]) < 2500 for r in late)
    assert summary["errors"]["DEADLINE_EXCEEDED"] == len(late)


def test_duration_mode(fake_frontend, inputs_npz, tmp_path):
    proc = loadgen("--target", fake_frontend.address, "--rate", 100, "--duration-s", 1.0,
                   "--warmup-queries", 5, "--inputs", inputs_npz, "--out", tmp_path, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows, summary = _read(tmp_path)
    assert summary["num_sent"] == len(rows) - 5
    assert 50 < summary["num_sent"] < 160  # Poisson(100), far tails excluded


def test_no_frontend_is_one_line_naming_the_address(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = loadgen("--target", f"127.0.0.1:{port}", "--num-queries", 5, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "make serve" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [
    ["--rate", "0"],
    ["--rate", "fast"],
    ["--num-queries", "5", "--duration-s", "3"],
    ["--inputs", "/nonexistent.npz"],
    ["--manifest", "/nonexistent.json"],
    ["--clients", "3", "--num-queries", "2"],
    ["--bogus"],
    ["serve", "--port", "-1"],
])
def test_cli_mistakes_are_one_line(args):
    proc = loadgen(*args, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_inputs_from_the_frontends_manifest_need_a_dataset(fake_frontend):
    proc = loadgen("--target", fake_frontend.address, "--num-queries", 5, timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_clients_split_the_rate_and_merge_records(fake_frontend, inputs_npz, tmp_path):
    proc = loadgen("--target", fake_frontend.address, "--rate", 200, "--num-queries", 101,
                   "--warmup-queries", 4, "--clients", 2, "--inputs", inputs_npz, "--out", tmp_path,
                   "--run-id", "multi", timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows, summary = _read(tmp_path)
    assert len(rows) == 105
    by_client = {}
    for r in rows:
        by_client.setdefault(r["client_index"], []).append(r)
    assert sorted(by_client) == ["0", "1"]
    assert len(by_client["0"]) == 51 + 2 and len(by_client["1"]) == 50 + 2
    assert {r["request_id"] for r in rows} == set(fake_frontend.seen)
    assert all(r["request_id"].startswith(f"multi-{r['client_index']}-") for r in rows)
    assert summary["meta"]["clients"] == 2 and len(summary["meta"]["generators"]) == 2
    assert summary["meta"]["redundancy_mode"] == "coded"
    assert summary["meta"]["spec"]["rate"] == 200 and summary["meta"]["spec"]["num_queries"] == 101
    assert summary["num_sent"] == 101


@pytest.mark.parametrize("sig, clients", [("SIGINT", 1), ("SIGINT", 2), ("SIGTERM", 2)])
def test_interrupt_stops_every_generator_process(fake_frontend, inputs_npz, sig, clients):
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "loadgen", "--target", fake_frontend.address,
                             "--rate", "50", "--duration-s", "600", "--clients", str(clients), "--inputs",
                             str(inputs_npz), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(fake_frontend.seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(fake_frontend.seen) >= 10
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == (clients if clients > 1 else 0)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
