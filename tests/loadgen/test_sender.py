"""The open-loop sender against an in-memory transport (no gRPC)."""

import asyncio

import numpy as np

from loadgen.schedule import build_schedule
from loadgen.sender import OpenLoopSender, QueryFailed, Reply


class SlowTransport:
    """Answers after ``delay_s``; label 9 fails with UNAVAILABLE."""

    def __init__(self, delay_s):
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = []

    async def __call__(self, request_id, x, timeout_s):
        self.calls.append((request_id, timeout_s))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        label = int(x[0])
        if label == 9:
            raise QueryFailed("UNAVAILABLE", "down")
        out = np.zeros(10, dtype=np.float32)
        out[label] = 1
        return Reply(out, "original", batch_id=label)


def _data(n=20):
    y = np.arange(n) % 10
    x = np.stack([y, y], axis=1).astype(np.float32)
    return x, y


def test_slow_answers_do_not_slow_the_arrivals():
    x, y = _data()
    schedule = build_schedule(100.0, num_examples=len(x), seed=4, num_queries=40, warmup_queries=5)
    transport = SlowTransport(delay_s=1.0)
    sender = OpenLoopSender(transport, schedule, x, y, deadline_s=3.0, run_id="t", client_index=2)
    records = asyncio.run(sender.run())
    assert len(records) == 45
    send = np.array([r.send_time_s for r in records])
    lag = np.array([r.send_lag_ms for r in records])
    # Sends follow the schedule (a closed loop would lag by ~1 s per query
    # and need 45 s in all); the bounds are loose for a loaded machine.
    assert np.all(lag >= 0)
    assert np.median(lag) < 250.0
    assert send[-1] < schedule.times_s[-1] + 2.0
    assert transport.max_in_flight >= 10
    assert all(r.latency_ms >= 1000.0 for r in records)
    assert [r.warmup for r in records] == [True] * 5 + [False] * 40
    assert [r.request_id for r in records] == [f"t-2-{i}" for i in range(45)]
    assert all(t == 3.0 for _, t in transport.calls)


def test_records_answers_errors_and_labels():
    x, y = _data()
    schedule = build_schedule(500.0, num_examples=len(x), seed=0, num_queries=60)
    sender = OpenLoopSender(SlowTransport(0.001), schedule, x, y, deadline_s=1.0)
    records = asyncio.run(sender.run())
    for r, example in zip(records, schedule.examples):
        assert r.label == y[example]
        if r.label == 9:
            assert (r.status, r.source, r.predicted) == ("UNAVAILABLE", "", -1)
        else:
            assert (r.status, r.source, r.predicted, r.batch_id) == ("OK", "original", r.label, r.label)
    assert sender.counters.sent == sender.counters.completed == 60
    assert sender.counters.errors == sum(r.label == 9 for r in records) > 0


def test_cancelling_a_run_records_outstanding_queries_as_cancelled():
    x, y = _data()
    schedule = build_schedule(200.0, num_examples=len(x), seed=1, num_queries=1000)
    sender = OpenLoopSender(SlowTransport(10.0), schedule, x, y, deadline_s=20.0)

    async def main():
        task = asyncio.create_task(sender.run())
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    leftover = asyncio.run(main())
    assert leftover == []
    records = sender.records
    assert 0 < len(records) < 1000
    assert {r.status for r in records} == {"CANCELLED"}
    assert sender.counters.completed == sender.counters.sent == len(records)


def test_arrivals_and_latency_on_an_injected_clock():
    """With a manual clock, sends happen exactly at the schedule's times and
    latency is exactly the transport's delay on that clock (no real sleeping)."""
    from services.common.clock import ManualClock

    clock = ManualClock(start_s=0.0)

    async def transport(request_id, x, timeout_s):
        await clock.sleep(0.25)
        return Reply(np.eye(10, dtype=np.float32)[int(x[0])], "original")

    x, y = _data()
    schedule = build_schedule(20.0, num_examples=len(x), seed=3, num_queries=12)

    async def body():
        sender = OpenLoopSender(transport, schedule, x, y, deadline_s=1.0, clock=clock)
        run = asyncio.create_task(sender.run())
        await clock.run_for(float(schedule.times_s[-1]) + 1.0)
        return await run

    records = asyncio.run(body())
    assert [r.send_time_s for r in records] == list(schedule.times_s)
    assert all(r.send_lag_ms == 0.0 for r in records)
    np.testing.assert_allclose([r.latency_ms for r in records], 250.0, rtol=1e-12)
    assert all(r.status == "OK" and r.predicted == r.label for r in records)
