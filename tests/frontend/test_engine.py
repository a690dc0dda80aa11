"""Unit tests of the engine: grouping, dispatch, decoding, cancellation, timeouts.

Fake instances and an injected ManualClock: time moves only when a test says so.
"""

import asyncio

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, InstanceFailed, InvalidInput, NoInstance, Overloaded
from services.common.clock import ManualClock
from services.frontend.coding import LocalCoder
from services.frontend.engine import Engine
from services.frontend.queues import make_queue_policy
from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED
from services.frontend.redundancy import Lateness, make_policy
from tests.frontend.fakes import FakeFleet, base_manifest, linear, settle, track

pytestmark = pytest.mark.timeout(30)


def make_engine(mode="none", queue_mode="single_queue", *, data=2, parity=0, backup=0, modes=None,
                fns=None, k=2, coder=None, hedge_delay_s=None, hedge_initial_delay_s=0.05,
                decode_policy="immediate", lateness=None, pools=None, zero_output=None, **kw):
    """An engine over fakes and a ManualClock. The decode policy defaults to
    ``immediate`` here, so the tests written for the paper's rule run it unchanged."""
    clock = ManualClock()
    fleet = FakeFleet(modes=modes, fns=fns)
    if coder is None and mode == "coded":
        coder = LocalCoder("sum")
    policy = make_policy(mode, k=k, coder=coder, hedge_delay_s=hedge_delay_s,
                         hedge_initial_delay_s=hedge_initial_delay_s,
                         lateness=lateness or Lateness(decode_policy), pools=pools, zero_output=zero_output)
    kw.setdefault("gc_interval_s", 0)
    e = track(Engine(base=base_manifest(), policy=policy, queue=make_queue_policy(queue_mode), clock=clock,
                     client_factory=fleet, **kw))
    for i in range(data):
        e.add_instance(f"d{i}", f"d{i}:1", "data")
    for i in range(parity):
        e.add_instance(f"p{i}", f"p{i}:1", "parity")
    for i in range(backup):
        e.add_instance(f"b{i}", f"b{i}:1", "backup")
    return e, clock, fleet


def x(i):
    return np.arange(4, dtype=np.float32) + 10 * i


def answers(queries):
    return [q.future.result() for q in queries]


@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
@pytest.mark.parametrize("mode", ["none", "equal"])
async def test_replication_answers_original(mode, queue_mode):
    e, clock, fleet = make_engine(mode, queue_mode, modes={"d0:1": "auto", "d1:1": "auto"})
    qs = [e.submit(x(i), f"r{i}") for i in range(6)]
    await settle()
    for i, a in enumerate(answers(qs)):
        assert a.source == ORIGINAL
        np.testing.assert_array_equal(a.output, linear(x(i)[None])[0])
    assert [a.batch_id for a in answers(qs)] == list(range(6))
    assert e.in_system == 0
    assert sorted(fleet["d0:1"].calls + fleet["d1:1"].calls) == list(range(6))
    if queue_mode == "rr":
        assert fleet["d0:1"].calls == [0, 2, 4] and fleet["d1:1"].calls == [1, 3, 5]
    await e.close()


async def test_single_queue_one_in_flight_per_instance_and_pull():
    e, clock, fleet = make_engine("none", data=2)
    qs = [e.submit(x(i)) for i in range(5)]
    await settle()
    assert fleet["d0:1"].pending_ids() == [0] and fleet["d1:1"].pending_ids() == [1]
    assert e.queue_depths()["data"] == 3
    fleet["d1:1"].release()
    await settle()
    # the idle instance pulls the next batch; the busy one gets nothing more
    assert fleet["d1:1"].pending_ids() == [2] and fleet["d0:1"].pending_ids() == [0]
    assert qs[1].future.done() and not qs[0].future.done()
    await e.close()


@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_a_second_call_goes_to_an_instance_only_when_every_instance_is_busy(queue_mode):
    # max_in_flight 2 over 3 instances: the first three batches go one to each
    # instance (least loaded first), the next three are pipelined, one onto each;
    # the seventh waits in the frontend.
    e, clock, fleet = make_engine("none", queue_mode, data=3, max_in_flight=2)
    qs = [e.submit(x(i)) for i in range(7)]
    await settle()
    pending = {a: fleet[a].pending_ids() for a in ("d0:1", "d1:1", "d2:1")}
    assert sorted(len(p) for p in pending.values()) == [2, 2, 2]
    assert sorted(p[0] for p in pending.values()) == [0, 1, 2]
    assert sorted(p[1] for p in pending.values()) == [3, 4, 5]
    assert e.queue_depths()["data"] == 1
    # The instance that finishes both its calls is the least loaded one: it takes batch 6.
    owner = next(a for a, p in pending.items() if p == [0, 3])
    fleet[owner].release()
    await settle()
    fleet[owner].release()
    await settle()
    assert fleet[owner].pending_ids() == [6]
    assert [q.future.done() for q in qs] == [True, False, False, True, False, False, False]
    await e.close()


async def test_with_one_instance_idle_no_call_is_pipelined_onto_a_busy_one():
    e, clock, fleet = make_engine("none", data=2, max_in_flight=2)
    [e.submit(x(i)) for i in range(2)]
    await settle()
    assert fleet["d0:1"].pending_ids() == [0] and fleet["d1:1"].pending_ids() == [1]
    fleet["d1:1"].release()
    await settle()
    e.submit(x(2))
    await settle()
    # d0 has a free slot too, but d1 is idle: the batch goes to d1.
    assert fleet["d1:1"].pending_ids() == [2] and fleet["d0:1"].pending_ids() == [0]
    assert e.has_idle_instance("data") is False
    fleet["d0:1"].release()
    await settle()
    assert e.has_idle_instance("data") is True
    await e.close()


async def test_rr_keeps_per_instance_queues():
    e, clock, fleet = make_engine("none", "rr", data=2)
    [e.submit(x(i)) for i in range(5)]
    await settle()
    assert fleet["d0:1"].pending_ids() == [0] and fleet["d1:1"].pending_ids() == [1]
    fleet["d1:1"].release()
    await settle()
    # batch 2 was assigned to d0's queue; d1 takes its own next (3)
    assert fleet["d1:1"].pending_ids() == [3]
    assert fleet["d0:1"].pending_ids() == [0]
    await e.close()


async def test_batching_fills_and_flushes_on_timeout():
    e, clock, fleet = make_engine("none", data=1, batch_size=3, batch_timeout_s=0.01,
                                  modes={"d0:1": "auto"})
    qs = [e.submit(x(i)) for i in range(4)]
    await settle()
    assert all(q.future.done() for q in qs[:3]) and not qs[3].future.done()
    assert answers(qs[:3])[0].batch_id == 0
    clock.advance(0.0099)
    await settle()
    assert not qs[3].future.done()
    clock.advance(0.0002)
    await settle()
    a = qs[3].future.result()
    assert a.batch_id == 1
    np.testing.assert_array_equal(a.output, linear(x(3)[None])[0])
    assert e.counters["partial_batches"] == 1
    await e.close()


async def test_validation_and_admission():
    e, clock, fleet = make_engine("none", data=1, max_in_system=2)
    with pytest.raises(InvalidInput, match="shape is \\[5\\].*expects \\[4\\]"):
        e.submit(np.zeros(5, np.float32))
    with pytest.raises(InvalidInput, match="dtype is float64.*expects float32"):
        e.submit(np.zeros(4, np.float64))
    e.submit(x(0)), e.submit(x(1))
    with pytest.raises(Overloaded, match="limit 2"):
        e.submit(x(2))
    assert e.counters["rejected_overloaded"] == 1 and e.counters["rejected_invalid"] == 2
    await e.close()


async def test_no_data_instance_is_unavailable():
    e, clock, fleet = make_engine("none", data=0)
    with pytest.raises(NoInstance):
        e.submit(x(0))
    await e.close()


async def test_client_deadline_and_abandon_remove_queued_batch():
    e, clock, fleet = make_engine("none", data=1)
    q0 = e.submit(x(0), timeout_s=5)
    q1 = e.submit(x(1), timeout_s=0.05)
    q2 = e.submit(x(2), timeout_s=5)
    await settle()
    assert e.queue_depths()["data"] == 2
    clock.advance(0.06)
    await settle()
    with pytest.raises(DeadlineExceeded):
        q1.future.result()
    # only the expired query's batch left the queue
    assert e.queue_depths()["data"] == 1
    e.abandon(q2)
    assert e.queue_depths()["data"] == 0 and e.in_system == 1
    fleet["d0:1"].release()
    await settle()
    assert q0.future.result().source == ORIGINAL and e.in_system == 0
    await e.close()


async def test_instance_timeout_redispatches_to_other_instance():
    e, clock, fleet = make_engine("none", data=2, instance_timeout_s=0.1,
                                  modes={"d0:1": "hang", "d1:1": "manual"})
    q = e.submit(x(0))
    await settle()
    assert fleet["d0:1"].calls == [0]
    clock.advance(0.11)
    await settle()
    assert e.counters["call_timeouts"] == 1 and e.counters["redispatches"] == 1
    assert fleet["d1:1"].pending_ids() == [0]
    fleet["d1:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL
    assert e.instances["d0"].in_flight == 0 and not e.instances["d0"].usable
    await e.close()


async def test_attempts_exhausted_fails_with_unavailable():
    e, clock, fleet = make_engine("none", data=1, max_attempts=2, modes={"d0:1": "error"})
    q = e.submit(x(0))
    await settle()
    clock.advance(0.15)   # backoff of the first failure ends; the retry runs
    await settle()
    with pytest.raises(InstanceFailed, match="2 instance calls"):
        q.future.result()
    assert fleet["d0:1"].calls == [0, 0] and e.in_system == 0
    await e.close()


async def test_removed_instance_is_erasure_and_rr_queue_moves():
    e, clock, fleet = make_engine("none", "rr", data=2)
    qs = [e.submit(x(i)) for i in range(4)]
    await settle()
    await e.remove_instance("d0")
    await settle()
    # d0's in-flight batch 0 and its queued batch 2 went to d1's queue
    assert fleet["d0:1"].closed
    for _ in range(4):
        fleet["d1:1"].release()
        await settle()
    assert all(q.future.result().source == ORIGINAL for q in qs)
    await e.close()


# ---------------------------------------------------------------- coded
async def coded_engine(**kw):
    return make_engine("coded", data=2, parity=1, k=2, **kw)


async def test_coded_ids_encode_and_reconstruct_exactly():
    e, clock, fleet = await coded_engine()
    qs = [e.submit(x(i), f"r{i}") for i in range(2)]
    await settle()
    g = e.groups[0]
    assert [m.batch_id for m in g.members] == [0, 1] and g.parity.batch_id == 2
    np.testing.assert_array_equal(g.parity.inputs[0], x(0) + x(1))
    assert fleet["p0:1"].pending_ids() == [2]
    fleet["d1:1"].release()
    fleet["p0:1"].release()
    await settle()
    a = qs[0].future.result()
    assert a.source == RECONSTRUCTED and a.batch_id == 0 and a.group_id == 0
    expected = linear((x(0) + x(1))[None])[0] - linear(x(1)[None])[0]
    np.testing.assert_allclose(a.output, expected, rtol=1e-6)
    assert qs[1].future.result().source == ORIGINAL
    assert e.counters["reconstructions"] == 1
    # the late original is recorded; then the group is finished and dropped
    fleet["d0:1"].release()
    await settle()
    assert e.counters["late_originals"] == 1 and g.late["max_abs_error"] < 1e-4
    assert g.finished and 0 not in e.groups
    await e.close()


async def test_coded_reconstructed_batch_removed_from_queue_only_it():
    # one data instance: batch 0 in flight, batch 1 queued, group 1's batch 3 queued too
    e, clock, fleet = make_engine("coded", data=1, parity=1, k=2)
    qs = [e.submit(x(i)) for i in range(4)]
    await settle()
    assert fleet["d0:1"].pending_ids() == [0]
    assert e.queue_depths()["data"] == 3            # batches 1, 3, 4
    fleet["p0:1"].release(2)
    await settle()
    assert e.queue_depths()["data"] == 3
    fleet["d0:1"].release(0)
    await settle()
    assert qs[1].future.result().source == RECONSTRUCTED
    # batch 1 was removed; batch 3 (other group) was not; d0 pulled 3 next
    assert fleet["d0:1"].pending_ids() == [3]
    assert e.queue_depths()["data"] == 1
    assert e.counters["removed_from_queue"] == 1
    await e.close()


async def test_coded_parity_removed_when_all_data_answered():
    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2)
    [e.submit(x(i)) for i in range(4)]   # two groups; parity 2 in flight, parity 5 queued
    await settle()
    assert fleet["p0:1"].pending_ids() == [2] and e.queue_depths()["parity"] == 1
    fleet["d0:1"].release(0); fleet["d1:1"].release(1)
    await settle()
    fleet["d0:1"].release(3); fleet["d1:1"].release(4)
    await settle()
    assert e.queue_depths()["parity"] == 0
    fleet["p0:1"].release(2)
    await settle()
    assert fleet["p0:1"].calls == [2]                # parity 5 was never sent
    assert not e.groups and e.counters["groups_finished"] == 2
    await e.close()


async def test_coded_original_preferred_when_already_there():
    e, clock, fleet = await coded_engine()
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    fleet["d0:1"].release(); fleet["d1:1"].release()
    await settle()
    fleet["p0:1"].release()
    await settle()
    assert [a.source for a in answers(qs)] == [ORIGINAL, ORIGINAL]
    assert e.counters["decodes"] == 0
    await e.close()


async def test_coded_failed_instance_decoded_when_group_allows():
    e, clock, fleet = await coded_engine(instance_timeout_s=0.2)
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    fleet["d1:1"].release(); fleet["p0:1"].release()
    fleet["d0:1"].fail()
    await settle()
    assert qs[0].future.result().source == RECONSTRUCTED
    await e.close()


async def test_coded_erasure_without_parity_is_redispatched():
    e, clock, fleet = await coded_engine()
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    fleet["d0:1"].fail(0)
    await settle()
    assert e.counters["redispatches"] == 1
    fleet["d1:1"].release(1)
    await settle()
    assert fleet["d1:1"].pending_ids() == [0]       # retried on the other instance
    fleet["d1:1"].release(0)
    await settle()
    assert [a.source for a in answers(qs)] == [ORIGINAL, ORIGINAL]
    await e.close()


async def test_coded_partial_group_has_no_parity_and_is_collected():
    e, clock, fleet = await coded_engine(group_timeout_s=0.5)
    q = e.submit(x(0))
    await settle()
    clock.advance(0.51)
    await settle()
    g = next(iter(e.groups.values()))
    assert g.sealed and g.parity is None and e.counters["partial_groups"] == 1
    assert fleet["p0:1"].calls == []
    fleet["d0:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL and not e.groups
    # the next query starts group 1 (ids 3, 4, parity 5)
    q2 = e.submit(x(1))
    await settle()
    assert q2.batch.batch_id == 3
    await e.close()


async def test_coded_padded_partial_batch_decodes_exactly():
    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2, batch_size=2, batch_timeout_s=0.01)
    qs = [e.submit(x(i)) for i in range(3)]
    await settle()
    clock.advance(0.02)                              # batch 1 flushes with one query
    await settle()
    g = e.groups[0]
    assert g.members[1].inputs.shape == (2, 4) and g.parity is not None
    fleet["d0:1"].release(0); fleet["p0:1"].release(2)
    await settle()
    a = qs[2].future.result()
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, linear(x(2)[None])[0], rtol=1e-5, atol=1e-5)
    await e.close()


async def test_coded_gc_abandons_stuck_group():
    e, clock, fleet = make_engine("coded", data=2, parity=1, k=2, gc_interval_s=1.0,
                                  query_timeout_s=1.0, instance_timeout_s=0.5, max_attempts=1,
                                  modes={"d0:1": "hang", "d1:1": "hang", "p0:1": "hang"})
    e.start()
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    for _ in range(40):
        clock.advance(0.25)
        await settle()
    assert all(q.done for q in qs) and not e.groups
    assert e.in_system == 0
    await e.close()


# ---------------------------------------------------------------- cheap
@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_cheap_backup_first_then_original(queue_mode):
    backup_fn = lambda a: linear(a) * 0.5  # noqa: E731 - an "approximate" model
    e, clock, fleet = make_engine("cheap", queue_mode, data=1, backup=1, fns={"b0:1": backup_fn})
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    assert fleet["b0:1"].pending_ids() == [0] and fleet["d0:1"].pending_ids() == [0]
    fleet["b0:1"].release(0)
    await settle()
    a = qs[0].future.result()
    assert a.source == BACKUP
    np.testing.assert_allclose(a.output, backup_fn(x(0)[None])[0])
    fleet["d0:1"].release(0)            # late original recorded
    await settle()
    assert e.counters["late_originals"] == 1
    fleet["d0:1"].release(1)            # original first: the queued backup twin is removed
    await settle()
    assert qs[1].future.result().source == ORIGINAL
    fleet["b0:1"].release(1)
    await settle()
    assert e.in_system == 0
    await e.close()


async def test_cheap_original_preferred():
    e, clock, fleet = make_engine("cheap", data=1, backup=1)
    q = e.submit(x(0))
    await settle()
    fleet["d0:1"].release(); fleet["b0:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL
    await e.close()


# ---------------------------------------------------------------- hedged
async def test_hedged_second_copy_after_delay():
    e, clock, fleet = make_engine("hedged", data=2, hedge_delay_s=0.02)
    q = e.submit(x(0))
    await settle()
    assert fleet["d0:1"].pending_ids() == [0] and fleet["d1:1"].pending_ids() == []
    clock.advance(0.019)
    await settle()
    assert fleet["d1:1"].pending_ids() == []
    clock.advance(0.002)
    await settle()
    assert fleet["d1:1"].pending_ids() == [0] and e.counters["hedges"] == 1
    fleet["d1:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL
    fleet["d0:1"].release()
    await settle()
    assert e.in_system == 0 and e.in_flight() == 0
    await e.close()


async def test_hedged_no_copy_when_answered_in_time():
    e, clock, fleet = make_engine("hedged", data=2, hedge_delay_s=0.02)
    q = e.submit(x(0))
    await settle()
    fleet["d0:1"].release()
    await settle()
    clock.advance(0.05)
    await settle()
    assert e.counters["hedges"] == 0 and fleet["d1:1"].calls == []
    assert q.future.result().source == ORIGINAL
    await e.close()


async def test_hedge_delay_defaults_to_recent_p95():
    e, clock, fleet = make_engine("hedged", data=1, hedge_initial_delay_s=0.05)
    assert e.policy.delay() == 0.05
    for i in range(100):
        e.policy.on_call_done("data", 0.001 * (i + 1))
    assert e.policy.delay() == pytest.approx(0.09505, rel=1e-3)
    await e.close()



async def test_close_fails_pending_queries_promptly():
    e, clock, fleet = make_engine("none", "rr", data=2, batch_size=2, batch_timeout_s=1.0)
    qs = [e.submit(x(i)) for i in range(5)]    # two batches in flight or queued, one forming
    await settle()
    await e.close()
    for q in qs:
        with pytest.raises(NoInstance, match="shutting down|no data instance"):
            q.future.result()
    assert e.in_system == 0


async def test_changed_address_replaces_instance():
    e, clock, fleet = make_engine("none", data=1)
    q = e.submit(x(0))
    await settle()
    e.add_instance("d0", "d0-new:1", "data")
    await settle()
    assert e.instances["d0"].address == "d0-new:1" and fleet["d0:1"].closed
    assert fleet["d0-new:1"].pending_ids() == [0]      # the erasure went to the new address
    fleet["d0-new:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL
    await e.close()


@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
@pytest.mark.parametrize("k", [2, 3])
async def test_coded_every_member_can_be_reconstructed(queue_mode, k):
    for missing in range(k):
        e, clock, fleet = make_engine("coded", queue_mode, data=k, parity=1, k=k)
        qs = [e.submit(x(i)) for i in range(k)]
        await settle()
        assert e.groups[0].parity.batch_id == k
        fleet["p0:1"].release(k)
        for i in range(k):
            if i != missing:
                client = next(c for c in fleet.clients.values() if i in c.pending_ids())
                client.release(i)
        await settle()
        a = qs[missing].future.result()
        assert a.source == RECONSTRUCTED and a.batch_id == missing
        np.testing.assert_allclose(a.output, linear(x(missing)[None])[0], rtol=1e-5, atol=1e-4)
        assert all(qs[i].future.result().source == ORIGINAL for i in range(k) if i != missing)
        await e.close()


async def test_hedged_in_rr_goes_to_another_instances_queue():
    e, clock, fleet = make_engine("hedged", "rr", data=2, hedge_delay_s=0.01)
    q = e.submit(x(0))
    await settle()
    assert fleet["d0:1"].pending_ids() == [0]
    clock.advance(0.02)
    await settle()
    assert fleet["d1:1"].pending_ids() == [0]
    fleet["d1:1"].release()
    await settle()
    assert q.future.result().source == ORIGINAL
    await e.close()


@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_coalescing_takes_queued_batches_in_one_call(queue_mode):
    e, clock, fleet = make_engine("none", queue_mode, data=1, max_coalesce=3)
    qs = [e.submit(x(i)) for i in range(6)]
    await settle()
    c = fleet["d0:1"]
    assert c.pending_ids() == [0]                 # the first batch left at once, alone
    c.release()
    await settle()
    assert c.pending_ids() == [1]                 # batches 1, 2, 3 in one call
    assert c.pending[0][0].inputs.shape == (3, 4)
    c.release()
    await settle()
    assert c.pending_ids() == [4] and c.pending[0][0].inputs.shape == (2, 4)
    c.release()
    await settle()
    for i, q in enumerate(qs):
        a = q.future.result()
        assert a.batch_id == i and a.source == ORIGINAL
        np.testing.assert_array_equal(a.output, linear(x(i)[None])[0])
    assert e.counters["calls"] == 3
    await e.close()


async def test_coalesced_call_failure_is_an_erasure_of_each_batch():
    e, clock, fleet = make_engine("none", data=2, max_coalesce=4, modes={"d0:1": "manual", "d1:1": "manual"})
    qs = [e.submit(x(i)) for i in range(4)]       # 0 -> d0, 1 -> d1, 2 and 3 queued
    await settle()
    fleet["d0:1"].release(0)
    await settle()
    assert fleet["d0:1"].pending_ids() == [2]     # 2 and 3 together
    fleet["d0:1"].fail(2)
    await settle()
    assert e.counters["redispatches"] == 2
    fleet["d1:1"].release(1)
    await settle()
    assert fleet["d1:1"].pending_ids() == [2] and fleet["d1:1"].pending[0][0].inputs.shape == (2, 4)
    fleet["d1:1"].release()
    await settle()
    assert [q.future.result().batch_id for q in qs] == [0, 1, 2, 3]
    await e.close()


def test_coalescing_is_refused_in_coded_mode():
    with pytest.raises(ValueError, match="coded"):
        make_engine("coded", data=1, parity=1, max_coalesce=2)


async def test_coded_through_the_executor_path():
    import concurrent.futures

    from services.frontend.engine import Engine
    from services.frontend.queues import SingleQueue
    from tests.frontend.fakes import base_manifest

    pool = concurrent.futures.ThreadPoolExecutor(1)
    clock = ManualClock()
    fleet = FakeFleet()
    e = track(Engine(base=base_manifest(), policy=make_policy("coded", k=2, coder=LocalCoder(
        "sum", executor=pool, inline_max_bytes=0), lateness=Lateness("immediate")), queue=SingleQueue(),
        clock=clock, client_factory=fleet, gc_interval_s=0))
    for name, role in (("d0", "data"), ("d1", "data"), ("p0", "parity")):
        e.add_instance(name, f"{name}:1", role)
    qs = [e.submit(x(i)) for i in range(2)]
    for _ in range(100):                      # the encode runs in the executor thread
        await asyncio.sleep(0.005)
        if fleet["p0:1"].pending:
            break
    g = e.groups[0]
    assert fleet["p0:1"].pending_ids() == [2] and g.encode_us > 0
    fleet["p0:1"].release()
    fleet["d1:1"].release()
    for _ in range(100):
        await asyncio.sleep(0.005)
        if qs[0].future.done():
            break
    a = qs[0].future.result()
    assert a.source == RECONSTRUCTED and g.decode_us > 0
    np.testing.assert_allclose(a.output, linear(x(0)[None])[0], rtol=1e-5, atol=1e-4)
    fleet["d0:1"].release()
    await settle()
    assert not e.groups
    await e.close()
    pool.shutdown()
