"""Regression tests of the frontend core under deadlines and faults (issue 13).

One test per item of the review, with the fakes and the injected clock; each
failed before its fix. Numbers in the names are the items.
"""

import threading

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, InstanceFailed
from services.frontend.records import ORIGINAL, RECONSTRUCTED
from tests.frontend.fakes import linear, settle
from tests.frontend.test_engine import make_engine, x

pytestmark = pytest.mark.timeout(60)


def status_of(q):
    if q.future.cancelled():
        return "CANCELLED"
    exc = q.future.exception()
    return type(exc).__name__ if exc is not None else q.future.result().source


# ------------------------------------------------------------------ 1
async def test_01_client_deadline_does_not_put_a_healthy_instance_in_backoff():
    e, clock, fleet = make_engine("none", data=1, instance_timeout_s=2.0)
    d0 = fleet["d0:1"]
    q = e.submit(x(0), timeout_s=0.03)
    await settle()
    assert d0.pending_ids() == [0]
    clock.advance(0.031)                    # the call's cap (the query's deadline) fires
    await settle()
    assert isinstance(q.future.exception(), DeadlineExceeded)
    inst = e.instances["d0"]
    assert inst.usable and inst.errors == 0 and inst.failures_in_row == 0
    assert e.counters["call_timeouts"] == 0 and e.counters["call_deadline_expired"] == 1
    assert e.in_flight() == 0               # the capped call ended and freed the slot
    q2 = e.submit(x(1), timeout_s=5.0)      # served at once, not after a backoff
    await settle()
    assert d0.pending_ids()[-1] == 1
    d0.release(1)
    await settle()
    assert q2.future.result().source == ORIGINAL


async def test_01_many_near_zero_deadlines_never_mark_the_instance_failed():
    e, clock, fleet = make_engine("none", data=1, instance_timeout_s=2.0)
    for i in range(20):
        e.submit(x(i), timeout_s=0.03)
    for _ in range(30):
        clock.advance(0.01)
        await settle()
    assert e.instances["d0"].failures_in_row == 0 and e.instances["d0"].errors == 0
    assert e.in_system == 0


async def test_01_batch_whose_queries_expired_while_forming_is_not_dispatched():
    e, clock, fleet = make_engine("none", data=1, batch_size=4, batch_timeout_s=0.05)
    qs = [e.submit(x(i), timeout_s=0.01) for i in range(2)]
    await settle()
    clock.advance(0.06)                     # both expire, then the batch flushes
    await settle()
    assert all(isinstance(q.future.exception(), DeadlineExceeded) for q in qs)
    assert fleet["d0:1"].calls == [] and e.counters["calls"] == 0


async def test_01_expired_queries_leave_a_forming_batch():
    e, clock, fleet = make_engine("none", data=1, batch_size=3, batch_timeout_s=0.05,
                                  modes={"d0:1": "auto"})
    q0 = e.submit(x(0), timeout_s=0.01)
    q1 = e.submit(x(1), timeout_s=5.0)
    clock.advance(0.02)
    q2 = e.submit(x(2), timeout_s=5.0)
    clock.advance(0.04)
    await settle()
    assert isinstance(q0.future.exception(), DeadlineExceeded)
    assert [q1.future.result().source, q2.future.result().source] == [ORIGINAL, ORIGINAL]
    assert fleet["d0:1"].calls == [0]
    np.testing.assert_array_equal(q2.future.result().output, linear(x(2)[None])[0])


# ------------------------------------------------------------------ 2
async def test_02_rr_failing_instance_queue_moves_to_the_live_one():
    e, clock, fleet = make_engine("none", "rr", data=2, modes={"d0:1": "error", "d1:1": "auto"},
                                  instance_timeout_s=2.0)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(40)]
    for _ in range(100):
        await settle()
        clock.advance(0.01)
    await settle()
    sources = [status_of(q) for q in qs]
    assert sources == [ORIGINAL] * 40, sources


async def test_02_rr_hung_instance_queue_moves_after_its_timeout():
    e, clock, fleet = make_engine("none", "rr", data=2, modes={"d0:1": "hang", "d1:1": "auto"},
                                  instance_timeout_s=2.0)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(40)]
    for _ in range(450):
        await settle()
        clock.advance(0.01)
    await settle()
    sources = [status_of(q) for q in qs]
    assert sources.count(ORIGINAL) == 40, sources


# ------------------------------------------------------------------ 3
@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_03_spent_member_waits_for_the_decode(queue_mode):
    e, clock, fleet = make_engine("coded", queue_mode, data=2, parity=1, max_attempts=1)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(2)]
    await settle()
    owner = next(c for c in fleet.clients.values() if 0 in c.pending_ids())
    owner.fail(0)                           # its only attempt
    await settle()
    assert not qs[0].future.done()          # the parity can still rebuild it
    other = next(c for c in fleet.clients.values() if 1 in c.pending_ids())
    other.release(1)
    fleet["p0:1"].release(2)
    await settle()
    a = qs[0].future.result()
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, linear(x(0)[None])[0], rtol=1e-5, atol=1e-4)
    assert not e.groups


async def test_03_spent_member_fails_at_once_when_the_decode_becomes_impossible():
    e, clock, fleet = make_engine("coded", data=2, parity=1, max_attempts=1)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(2)]
    await settle()
    fleet["d0:1"].fail(0)
    await settle()
    assert not qs[0].future.done()
    fleet["p0:1"].fail(2)                   # the parity is spent too
    await settle()
    assert isinstance(qs[0].future.exception(), InstanceFailed)
    fleet["d1:1"].release(1)
    await settle()
    assert qs[1].future.result().source == ORIGINAL and not e.groups


async def test_03_spent_member_waits_no_longer_than_its_deadline():
    e, clock, fleet = make_engine("coded", data=2, parity=1, max_attempts=1)
    qs = [e.submit(x(i), timeout_s=0.5) for i in range(2)]
    await settle()
    fleet["d0:1"].fail(0)
    await settle()
    clock.advance(0.51)
    await settle()
    assert isinstance(qs[0].future.exception(), DeadlineExceeded)


# ------------------------------------------------------------------ 5
async def test_05_member_needed_by_a_sibling_stays_queued_when_its_queries_go():
    e, clock, fleet = make_engine("coded", "rr", data=2, parity=1, k=2)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(4)]   # d0: 0, [3]; d1: 1, [4]; p0: 2, [5]
    await settle()
    fleet["d0:1"].release(0)                # d0 takes 3 and is slow with it
    fleet["p0:1"].release(2)                # p0 takes parity 5
    await settle()
    assert fleet["d0:1"].pending_ids() == [3] and fleet["p0:1"].pending_ids() == [5]
    e.abandon(qs[3])                        # batch 4's client goes away
    assert e.queue_depths()["data"] == 1    # batch 4 is kept: batch 3's decode needs it
    fleet["p0:1"].release(5)
    fleet["d1:1"].release(1)                # d1 takes 4
    await settle()
    assert fleet["d1:1"].pending_ids() == [4]
    fleet["d1:1"].release(4)
    await settle()
    a = qs[2].future.result()               # reconstructed, while d0 still holds batch 3
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, linear(x(2)[None])[0], rtol=1e-5, atol=1e-4)


async def test_05_kept_member_call_is_capped_by_the_group_deadline():
    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2, instance_timeout_s=2.0)
    q0 = e.submit(x(0), timeout_s=1.0)
    q1 = e.submit(x(1), timeout_s=0.1)
    await settle()
    e.abandon(q1)
    clock.advance(0.2)                      # past q1's own deadline: its call must run on
    await settle()
    assert fleet["d1:1"].pending_ids() == [1] and e.counters["call_deadline_expired"] == 0
    fleet["p0:1"].release(2)
    fleet["d1:1"].release(1)
    await settle()
    assert q0.future.result().source == RECONSTRUCTED


# ------------------------------------------------------------------ 6
async def test_06_parity_nobody_needs_is_not_dispatched():
    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(4)]   # parity 2 in flight, parity 5 queued
    await settle()
    assert fleet["p0:1"].pending_ids() == [2] and e.queue_depths()["parity"] == 1
    e.abandon(qs[2])
    e.abandon(qs[3])                        # group 1's queries are gone
    fleet["p0:1"].release(2)
    await settle()
    assert fleet["p0:1"].calls == [2]       # parity 5 was never sent
    assert e.queue_depths().get("parity", 0) == 0


async def test_06_requeued_parity_nobody_needs_is_not_dispatched_again():
    e, clock, fleet = make_engine("coded", "rr", data=2, parity=2, k=2)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(8)]   # parities 2, 8 -> p0; 5, 11 -> p1
    await settle()
    assert fleet["p0:1"].pending_ids() == [2] and fleet["p1:1"].pending_ids() == [5]
    e.abandon(qs[4])
    e.abandon(qs[5])                        # group 2 (parity 8) is of no use any more
    await e.remove_instance("p0")           # 2 and 8 move to p1
    await settle()
    for _ in range(6):
        for c in fleet.clients.values():
            while c.pending:
                c.release()
        await settle()
    assert 8 not in fleet["p1:1"].calls, fleet["p1:1"].calls
    assert all(status_of(q) in (ORIGINAL, RECONSTRUCTED) for i, q in enumerate(qs) if i not in (4, 5))


# ------------------------------------------------------------------ 7
async def test_07_metrics_read_engine_state_on_the_loop_thread_only():
    import asyncio

    from services.frontend.observe import Metrics

    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2)
    loop_thread = threading.get_ident()
    readers = []
    depths = e.queue.depths

    def spy():
        readers.append(threading.get_ident())
        return depths()

    e.queue.depths = spy
    m = Metrics()
    m.attach(e)
    m.loop = asyncio.get_running_loop()
    [e.submit(x(i)) for i in range(6)]
    text = await asyncio.to_thread(lambda: __import__("prometheus_client").generate_latest(m.registry))
    assert readers and set(readers) == {loop_thread}
    assert b'parm_frontend_queue_depth{role="data"} 4.0' in text
    assert b"parm_frontend_partial_groups_total 0.0" in text
    await e.close()


# ------------------------------------------------------------------ 8
@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_08_last_backup_leaving_fails_a_spent_query_at_once(queue_mode):
    e, clock, fleet = make_engine("cheap", queue_mode, data=1, backup=1, max_attempts=1,
                                  fns={"b0:1": lambda a: linear(a) * 0.5})
    q0 = e.submit(x(0), timeout_s=30.0)
    q1 = e.submit(x(1), timeout_s=30.0)     # its backup twin waits behind batch 0's
    await settle()
    assert fleet["b0:1"].pending_ids() == [0] and fleet["d0:1"].pending_ids() == [0]
    fleet["d0:1"].release(0)                # original first; backup twin 0 runs on
    await settle()
    assert q0.future.result().source == ORIGINAL
    assert fleet["d0:1"].pending_ids() == [1]
    fleet["d0:1"].fail(1)                   # batch 1's data twin: its only attempt
    await settle()
    assert not q1.future.done()             # the queued backup twin may still answer
    await e.remove_instance("b0")           # the last backup instance leaves
    await settle()
    assert isinstance(q1.future.exception(), InstanceFailed)   # at once, not after 30 s
    assert e.in_system == 0


# ------------------------------------------------------------------ 9
async def test_09_rr_detach_requeues_oldest_first():
    e, clock, fleet = make_engine("none", "rr", data=3)
    [e.submit(x(i), timeout_s=5.0) for i in range(12)]   # d0: 0 running, 3, 6, 9 queued
    await settle()
    await e.remove_instance("d0")
    await settle()
    for _ in range(8):
        for name in ("d1:1", "d2:1"):
            if fleet[name].pending:
                fleet[name].release()
        await settle()
    moved = {0, 3, 6, 9}
    for name in ("d1:1", "d2:1"):
        calls = fleet[name].calls
        got = [b for b in calls if b in moved]
        assert got == sorted(got), (name, calls)          # not reversed
        assert calls[1:] == sorted(calls[1:]), (name, calls)  # and by age among its own
    assert sorted(fleet["d1:1"].calls + fleet["d2:1"].calls) == list(range(12))


async def test_09_requeued_parity_dropped_for_want_of_instances_closes_its_group():
    e, clock, fleet = make_engine("coded", "rr", data=2, parity=1, k=2)
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(4)]   # parity 2 running, 5 queued on p0
    await settle()
    assert fleet["p0:1"].pending_ids() == [2]
    e.abandon(qs[2])
    e.abandon(qs[3])                        # group 1 waits only for its queued parity
    await e.remove_instance("p0")           # the parity is dropped: no parity instance left
    await settle()
    assert 1 not in e.groups, "group 1 lingers until GC"
    for _ in range(6):
        for c in (fleet["d0:1"], fleet["d1:1"]):
            while c.pending:
                c.release()
        await settle()
    assert [status_of(q) for q in qs[:2]] == [ORIGINAL, ORIGINAL]
    assert not e.groups, list(e.groups)


async def test_03_spent_member_fails_at_once_when_the_decode_errors():
    class BrokenDecoder:
        def inline(self, nbytes):
            return True

        def encode_now(self, inputs):
            return sum(np.asarray(x, np.float32) for x in inputs)

        def decode_now(self, parity_output, available):
            raise RuntimeError("decoder broke")

    e, clock, fleet = make_engine("coded", data=2, parity=1, max_attempts=1, coder=BrokenDecoder())
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(2)]
    await settle()
    fleet["d0:1"].fail(0)
    fleet["d1:1"].release(1)
    fleet["p0:1"].release(2)
    await settle()
    assert e.counters["decode_errors"] == 1
    assert isinstance(qs[0].future.exception(), InstanceFailed)     # at once, not at its deadline
    assert qs[1].future.result().source == ORIGINAL and not e.groups
