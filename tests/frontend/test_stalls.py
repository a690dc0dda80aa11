"""The frontend's stall monitor (observe.Stalls): event-loop lateness and long collections, in stalls.jsonl."""

import asyncio
import gc
import json
import os
import subprocess
import sys
import time

import pytest

from services.frontend.observe import CpuWait, Stalls

pytestmark = pytest.mark.timeout(30)


def lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


async def test_a_blocked_loop_is_recorded_with_when_and_how_long(tmp_path):
    stalls = Stalls(tmp_path, interval_s=0.005, loop_min_ms=5.0, gc_min_ms=1e9)
    stalls.start()
    await asyncio.sleep(0.03)
    before = time.time()
    time.sleep(0.04)            # holds the loop: the probe runs about 40 ms late
    await asyncio.sleep(0.03)
    stalls.flush()
    (loop,) = [s for s in lines(tmp_path / "stalls.jsonl") if s["kind"] == "loop"]
    assert 30.0 <= loop["ms"] <= 200.0
    # start_s is when the probe was due: within the blocked interval (before it, by < 1 interval)
    assert before - 0.01 <= loop["start_s"] <= before + 0.04
    assert stalls.counts["loop"] == 1
    stalls.close()


async def test_a_collection_over_the_minimum_is_recorded_and_close_unhooks_it(tmp_path):
    stalls = Stalls(tmp_path, interval_s=0.01, loop_min_ms=1e9, gc_min_ms=0.0)
    stalls.start()
    assert stalls._on_gc in gc.callbacks
    gc.collect()
    stalls.flush()
    recs = [s for s in lines(tmp_path / "stalls.jsonl") if s["kind"] == "gc"]
    assert any(r["generation"] == 2 and r["ms"] >= 0.0 for r in recs)
    stalls.close()
    assert stalls._on_gc not in gc.callbacks and stalls._handle is None
    n = len(lines(tmp_path / "stalls.jsonl"))
    gc.collect()                # unhooked: nothing more is recorded
    await asyncio.sleep(0.02)
    assert len(lines(tmp_path / "stalls.jsonl")) == n
    stalls.close()              # a second close is harmless


async def test_a_quiet_loop_records_nothing(tmp_path):
    stalls = Stalls(tmp_path, interval_s=0.005, loop_min_ms=50.0, gc_min_ms=1e9, cpu_min_ms=1e9)
    stalls.start()
    await asyncio.sleep(0.05)
    stalls.close()
    assert (tmp_path / "stalls.jsonl").read_text() == ""


def fake_proc(root, threads, psi_us=None):
    """A /proc with this process's threads' schedstat (tid -> wait ns) and the machine's PSI."""
    for tid, wait in threads.items():
        (root / "self" / "task" / str(tid)).mkdir(parents=True, exist_ok=True)
        (root / "self" / "task" / str(tid) / "schedstat").write_text(f"1000 {wait} 7\n")
    if psi_us is not None:
        (root / "pressure").mkdir(exist_ok=True)
        (root / "pressure" / "cpu").write_text(
            f"some avg10=1.00 avg60=0.50 avg300=0.10 total={psi_us}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_cpu_wait_sums_the_growth_over_threads_and_follows_threads_coming_and_going(tmp_path):
    fake_proc(tmp_path, {1: 5_000_000, 2: 1_000_000}, psi_us=1_000)
    meter = CpuWait(str(tmp_path), rescan_s=0.0)
    assert meter.available
    assert meter.sample() == (0.0, 0.0)         # the baseline: earlier waits are not counted
    fake_proc(tmp_path, {1: 7_000_000, 2: 1_500_000, 3: 9_000_000}, psi_us=4_500)
    # thread 3 is new: counted from its first sample on
    assert meter.sample() == (2.5, 3.5)
    fake_proc(tmp_path, {1: 7_000_000, 2: 1_500_000, 3: 10_000_000}, psi_us=4_500)
    assert meter.sample() == (1.0, 0.0)
    (tmp_path / "self" / "task" / "3" / "schedstat").unlink()
    (tmp_path / "self" / "task" / "3").rmdir()  # thread 3 ended
    fake_proc(tmp_path, {1: 8_000_000, 2: 1_500_000}, psi_us=5_000)
    assert meter.sample() == (1.0, 0.5)
    assert set(meter._fds) == {"1", "2"}
    meter.close()
    assert meter._fds == {} and not meter.available and meter.sample() == (0.0, None)


def test_cpu_wait_without_psi_or_schedstat(tmp_path):
    fake_proc(tmp_path, {1: 0})
    meter = CpuWait(str(tmp_path), rescan_s=0.0)
    fake_proc(tmp_path, {1: 3_000_000})
    meter.sample()
    fake_proc(tmp_path, {1: 4_000_000})
    assert meter.sample() == (1.0, None)        # no PSI on this kernel: machine_ms is None
    meter.close()
    bare = CpuWait(str(tmp_path / "nothing"))
    assert not bare.available and bare.sample() == (0.0, None)
    bare.close()


async def test_a_frontend_that_shares_its_cpu_records_how_long_it_waited(tmp_path):
    """A busy process on the same CPU as a busy event loop: the loop's thread waits for the CPU."""
    if not os.path.exists("/proc/self/task") or not CpuWait().available:
        pytest.skip("no per-thread schedstat on this kernel")
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {cpu})          # this thread (the event loop's) only
        stalls = Stalls(tmp_path, interval_s=0.005, loop_min_ms=1e9, gc_min_ms=1e9, cpu_min_ms=0.5)
        stalls.start()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:           # busy: the loop's thread wants the CPU all the time
            spin = time.monotonic() + 0.02
            while time.monotonic() < spin:
                pass
            await asyncio.sleep(0)
        stalls.close()
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    recs = [s for s in lines(tmp_path / "stalls.jsonl") if s["kind"] == "cpu"]
    waited = sum(r["ms"] for r in recs)
    # Sharing one CPU with a spinning process, the loop's thread waits about half the time (~300 ms).
    assert waited >= 100.0, recs
    assert all(r["span_ms"] > 0 and r["ms"] >= 0.5 for r in recs)
    assert stalls.counts["cpu"] == len(recs)
