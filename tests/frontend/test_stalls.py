"""The frontend's stall monitor (observe.Stalls): event-loop lateness and long collections, in stalls.jsonl."""

import asyncio
import gc
import json
import time

import pytest

from services.frontend.observe import Stalls

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
    stalls = Stalls(tmp_path, interval_s=0.005, loop_min_ms=50.0, gc_min_ms=1e9)
    stalls.start()
    await asyncio.sleep(0.05)
    stalls.close()
    assert (tmp_path / "stalls.jsonl").read_text() == ""
