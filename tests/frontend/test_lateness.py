"""The decode policy (issue 14): reconstructions and backup answers only for late batches.

Injected clock throughout: the threshold is 50 ms (the initial value) unless a
test feeds latencies.
"""

import asyncio
import json
import urllib.request

import numpy as np
import pytest

from parm.v1 import frontend_pb2
from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED
from services.frontend.redundancy import Lateness
from tests.frontend.fakes import linear, settle
from tests.frontend.test_engine import make_engine, x

pytestmark = pytest.mark.timeout(60)

T = 0.05            # the initial threshold
MARGIN = 0.002      # answers this long before a deadline


def late(**kw):
    return Lateness("late", initial_s=T, margin_s=MARGIN, **kw)


async def coded_group(clock, e, fleet, deadline_s=5.0):
    """Two queries, one group: batch 0 on d0 (the straggler), batch 1 on d1, parity 2 on p0."""
    t0 = clock.now()
    qs = [e.submit(x(i), timeout_s=deadline_s) for i in range(2)]
    await settle()
    fleet["d1:1"].release(1)
    fleet["p0:1"].release(2)
    await settle()
    assert e.counters["decodes"] == 1
    return qs, t0


async def test_coded_original_before_the_threshold_wins_and_the_reconstruction_is_discarded():
    e, clock, fleet = make_engine("coded", data=2, parity=1, lateness=late())
    qs, t0 = await coded_group(clock, e, fleet)
    assert not qs[0].done and e.counters["held_for_lateness"] == 1
    clock.advance(0.03)
    fleet["d0:1"].release(0)                 # 30 ms: before the 50 ms threshold
    await settle()
    a = qs[0].future.result()
    assert a.source == ORIGINAL and qs[0].lateness_wait_s is None
    np.testing.assert_array_equal(a.output, linear(x(0)[None])[0])
    assert e.counters["substitutes_discarded"] == 1 and e.counters["reconstructions"] == 0
    assert e.counters["late_originals"] == 0 and not e.groups
    clock.advance(0.1)                       # the discarded hold never fires
    await settle()
    assert e.counters["reconstructions"] == 0
    await e.close()


async def test_coded_original_after_the_threshold_reconstructed_at_the_threshold():
    e, clock, fleet = make_engine("coded", data=2, parity=1, lateness=late())
    qs, t0 = await coded_group(clock, e, fleet)   # decoded at t0, when the batch formed
    clock.advance(T - 1e-6)
    await settle()
    assert not qs[0].done                    # not yet late
    clock.advance(2e-6)
    await settle()
    a = qs[0].future.result()
    assert a.source == RECONSTRUCTED
    assert qs[0].answered_s == pytest.approx(t0 + T)
    assert qs[0].lateness_wait_s == pytest.approx(T)
    np.testing.assert_allclose(a.output, linear(x(0)[None])[0], rtol=1e-5, atol=1e-4)
    assert e.counters["reconstructions"] == 1 and e.groups[0].missing == 0
    fleet["d0:1"].release(0)                 # the original, after its reconstruction
    await settle()
    assert e.counters["late_originals"] == 1 and not e.groups
    await e.close()


async def test_coded_deadline_before_the_threshold_reconstructed_just_before_it():
    e, clock, fleet = make_engine("coded", data=2, parity=1, lateness=late())
    qs, t0 = await coded_group(clock, e, fleet, deadline_s=0.02)
    clock.advance(0.02 - MARGIN - 1e-6)
    await settle()
    assert not qs[0].done
    clock.advance(2e-6)
    await settle()
    assert qs[0].future.result().source == RECONSTRUCTED
    assert qs[0].answered_s == pytest.approx(t0 + 0.02 - MARGIN)
    assert qs[0].answered_s < qs[0].deadline_s
    await e.close()


async def test_coded_held_reconstruction_answers_at_once_when_the_original_cannot_come():
    e, clock, fleet = make_engine("coded", data=2, parity=1, max_attempts=1, lateness=late())
    qs, t0 = await coded_group(clock, e, fleet)
    fleet["d0:1"].fail(0)                    # its only attempt: no original will come
    await settle()
    assert qs[0].future.result().source == RECONSTRUCTED
    assert qs[0].answered_s == t0 and qs[0].lateness_wait_s == 0.0
    await e.close()


async def test_immediate_is_the_papers_rule():
    e, clock, fleet = make_engine("coded", data=2, parity=1, decode_policy="immediate")
    qs, t0 = await coded_group(clock, e, fleet)
    assert qs[0].future.result().source == RECONSTRUCTED and qs[0].answered_s == t0
    assert e.counters["held_for_lateness"] == 0
    await e.close()


def test_threshold_follows_a_shifted_latency_distribution():
    gate = Lateness("late", initial_s=T, window=100, every=10, min_samples=20)

    class B:
        created_s = 0.0

    assert gate.threshold_s() == T           # the initial value until 20 samples
    for i in range(19):
        gate.observe(B, 0.010 + 0.0001 * i)
    assert gate.threshold_s() == T
    gate.observe(B, 0.012)
    assert gate.threshold_s() == pytest.approx(np.quantile([0.010 + 0.0001 * i for i in range(19)] + [0.012],
                                                           0.95))
    assert 0.0115 < gate.threshold_s() < 0.0125
    for i in range(100):                     # the service slows down: 40 ms +- 2 ms
        gate.observe(B, 0.040 + 0.00004 * (i % 50))
    assert 0.040 < gate.threshold_s() < 0.042
    for i in range(100):                     # and speeds up again
        gate.observe(B, 0.005)
    assert gate.threshold_s() == pytest.approx(0.005)


async def test_threshold_is_learnt_from_data_batch_latencies():
    e, clock, fleet = make_engine("coded", data=2, parity=1, lateness=late(min_samples=4, every=1))
    for i in range(4):                       # originals answering 10 ms after formation
        q = e.submit(x(i), timeout_s=5.0)
        await settle()
        clock.advance(0.01)
        for c in fleet.clients.values():
            while c.pending:
                c.release()
        await settle()
        assert q.future.result().source == ORIGINAL
    assert e.policy.lateness.threshold_s() == pytest.approx(0.01)
    assert e.snapshot()["gauges"]["late_threshold_s"] == pytest.approx(0.01)
    await e.close()


@pytest.mark.parametrize("queue_mode", ["single_queue", "rr"])
async def test_cheap_backup_answer_waits_for_lateness(queue_mode):
    fns = {"b0:1": lambda a: linear(a) * 0.5}
    e, clock, fleet = make_engine("cheap", queue_mode, data=1, backup=1, fns=fns, lateness=late())
    q0 = e.submit(x(0), timeout_s=5.0)
    await settle()
    t0 = clock.now()
    fleet["b0:1"].release(0)                 # the backup first: held
    await settle()
    assert not q0.done
    clock.advance(0.02)
    fleet["d0:1"].release(0)                 # the original within the threshold wins
    await settle()
    assert q0.future.result().source == ORIGINAL and e.counters["substitutes_discarded"] == 1
    q1 = e.submit(x(1), timeout_s=5.0)       # batch 1: its backup answers, its original is late
    await settle()
    t1 = clock.now()
    fleet["b0:1"].release(1)
    await settle()
    clock.advance(T + 1e-6)
    await settle()
    a = q1.future.result()
    assert a.source == BACKUP and q1.answered_s == pytest.approx(t1 + T, abs=1e-5)
    np.testing.assert_allclose(a.output, linear(x(1)[None])[0] * 0.5, rtol=1e-6)
    fleet["d0:1"].release(1)
    await settle()
    assert e.counters["late_originals"] == 1 and e.in_system == 0
    assert t0 <= t1
    await e.close()


async def test_cheap_deadline_wins_and_spent_original_releases_the_backup():
    fns = {"b0:1": lambda a: linear(a) * 0.5}
    e, clock, fleet = make_engine("cheap", data=1, backup=1, fns=fns, max_attempts=1, lateness=late())
    q0 = e.submit(x(0), timeout_s=0.03)
    await settle()
    t0 = clock.now()
    fleet["b0:1"].release(0)
    await settle()
    clock.advance(0.03 - MARGIN + 1e-6)
    await settle()
    assert q0.future.result().source == BACKUP and q0.answered_s == pytest.approx(t0 + 0.03 - MARGIN, abs=1e-5)
    fleet["d0:1"].release(0)
    await settle()
    q1 = e.submit(x(1), timeout_s=5.0)
    await settle()
    fleet["b0:1"].release(1)
    await settle()
    fleet["d0:1"].fail(1)                    # the data twin's only attempt: the backup answers now
    await settle()
    assert q1.future.result().source == BACKUP and q1.lateness_wait_s == 0.0
    await e.close()


async def test_cheap_immediate_backup_answers_at_once():
    e, clock, fleet = make_engine("cheap", data=1, backup=1, decode_policy="immediate")
    q = e.submit(x(0), timeout_s=5.0)
    await settle()
    fleet["b0:1"].release(0)
    await settle()
    assert q.future.result().source == BACKUP
    await e.close()


def test_decode_policy_is_validated():
    with pytest.raises(ValueError, match="unknown decode policy 'soon'"):
        Lateness("soon")


async def test_threshold_and_waits_in_status_metrics_and_records(models, tmp_path):
    from tests.frontend.test_service import Deployment

    records = tmp_path / "records"
    d = await Deployment().start(
        models, {"d0": ("data", {"delay_s": 1.0}), "d1": ("data", {}), "p0": ("parity", {})},
        "--mode", "coded", "--parity-model", models["parity"], "--records-dir", records,
        "--metrics-port", 0, "--queue-mode", "rr", "--decode-policy", "late", "--late-initial-ms", 200)
    try:
        first = asyncio.ensure_future(d.predict(x(0), "r0"))
        await asyncio.sleep(0.05)
        other = await d.predict(x(1), "r1")
        slow = await first
        assert slow.source == frontend_pb2.RECONSTRUCTED and other.source == frontend_pb2.ORIGINAL
        assert 150 < slow.frontend_latency_ms < 900      # held until late (200 ms), not the 1 s original
        status = await d.stub.GetStatus(frontend_pb2.GetStatusRequest(), timeout=5)
        assert status.counters["decode_policy_late"] == 1
        assert status.counters["late_threshold_us"] == 200000
        assert status.counters["held_for_lateness"] == 1
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{d.app.metrics_port}/metrics").read().decode())
        assert "parm_frontend_late_threshold_seconds 0.2" in body
        # padding is on by default; 2 latencies known (< 20): the group waits --group-timeout-ms
        assert status.counters["group_wait_us"] == 1_000_000
        assert "parm_frontend_group_wait_seconds 1.0" in body
        await asyncio.sleep(1.1)
    finally:
        await d.close()
    lines = [json.loads(s) for s in (records / "queries.jsonl").read_text().splitlines()]
    queries = {r["request_id"]: r for r in lines if r["type"] == "query"}
    assert 100 < queries["r0"]["lateness_wait_ms"] < 250
    assert queries["r1"]["lateness_wait_ms"] is None
    groups = [json.loads(s) for s in (records / "groups.jsonl").read_text().splitlines()]
    assert groups[0]["late_threshold_ms"] == 200.0 and groups[0]["decoded_index"] == 0
    assert groups[0]["missing_index"] == 0 and groups[0]["late_original"]["argmax_agreement"] == 1.0
    # Opened by r0, sealed by r1 about 50 ms later (only then could the parity be sent).
    assert 0.04 < groups[0]["sealed_s"] - groups[0]["formed_s"] < 0.5
    assert abs(groups[0]["sealed_s"] - queries["r1"]["received_s"]) < 0.02
    # The decode's inputs in order: sealed -> parity sent -> parity and r1 answered -> decoded;
    # the reconstruction then waited (held) until r0 was late; r0's original came ~1 s in.
    g = groups[0]
    assert g["sealed_s"] <= g["parity_dispatched_s"] < g["parity_answered_s"] <= g["decoded_s"]
    assert g["data_answered_s"][1] == pytest.approx(queries["r1"]["answered_s"], abs=0.005)
    assert g["decoded_s"] == pytest.approx(max(g["parity_answered_s"], g["data_answered_s"][1]), abs=0.005)
    assert g["decoded_s"] < queries["r0"]["answered_s"] - 0.1
    assert 0.9 < g["data_answered_s"][0] - g["formed_s"] < 1.5
    # Where each call went and when (the tail report's behind_shuffles reads these).
    assert g["data_instances"][1] == [queries["r1"]["instance_id"]] and len(g["data_instances"][0]) == 1
    assert len(g["parity_instances"]) == 1 and g["parity_instances"] != g["data_instances"][0]
    assert g["formed_s"] <= g["data_dispatched_s"][0] < g["data_answered_s"][0]
    assert g["data_dispatched_s"][1] < g["data_answered_s"][1]
