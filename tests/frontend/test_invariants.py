"""Randomised event sequences against the engine's invariants (docstring of engine.py).

Each seed drives one mode, queue mode and decode policy (``immediate``,
``late``) through a random mix of arrivals, replies, failures, hangs, joins
and leaves (the last parity or backup instance included), client
cancellations and clock advances (which fire batch/group/hedge/lateness/
call/query timers), with deadlines from near zero to seconds and
``max_attempts`` down to 1; then lets everything time out.
Afterwards:

* every admitted query is done exactly once (one record), nothing is in the
  system, in flight, queued or in the group table;
* every answer has the value its source promises (the model is linear, so
  reconstructions are exact up to float rounding), and no query is answered
  or failed later than its deadline; DEADLINE_EXCEEDED only at the deadline;
* no instance is marked failed by a client's deadline: every call blamed on
  its instance for a timeout ran the full instance timeout;
* no coding group outlives its queries by more than the GC period.
"""

import os
import random

import numpy as np
import pytest

from services.frontend.engine import NullObserver
from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED
from tests.frontend.fakes import linear, settle
from tests.frontend.test_engine import make_engine

pytestmark = pytest.mark.timeout(180)

MODES = ["none", "coded", "cheap", "hedged"]
GC_INTERVAL_S = 0.5
INSTANCE_TIMEOUT_S = 0.2


def backup_fn(a):
    return linear(a) * 0.5


class Recorder(NullObserver):
    def __init__(self, clock):
        self.clock = clock
        self.done = {}              # qid -> number of records
        self.groups = []            # (group, finished_s)
        self.failed_calls = []      # (call, ended_s, timeout, health)

    def query_done(self, q, batch, group_id):
        self.done[q.qid] = self.done.get(q.qid, 0) + 1

    def group_done(self, g, reason):
        self.groups.append((g, self.clock.now(), reason))

    def call_failed(self, call, exc, timeout, health):
        self.failed_calls.append((call, self.clock.now(), timeout, health))


def scenario(seed):
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    queue_mode = ["single_queue", "rr"][(seed // len(MODES)) % 2]
    decode_policy = ["immediate", "late"][(seed // (2 * len(MODES))) % 2]
    return rng, mode, queue_mode, decode_policy


@pytest.mark.parametrize("seed", range(int(os.environ.get("PARM_INVARIANT_SEEDS", "32"))))
async def test_random_events_keep_the_invariants(seed):
    rng, mode, queue_mode, decode_policy = scenario(seed)
    k = rng.choice([2, 3])
    batch_size = rng.choice([1, 1, 2, 3])
    kw = dict(k=k, batch_size=batch_size, batch_timeout_s=0.005, group_timeout_s=0.05,
              instance_timeout_s=INSTANCE_TIMEOUT_S, query_timeout_s=1.0,
              max_attempts=rng.choice([1, 1, 2, 3]), max_in_flight=rng.choice([1, 2]),
              gc_interval_s=GC_INTERVAL_S)
    if mode == "hedged":
        kw["hedge_delay_s"] = 0.02
    if mode in ("none", "cheap", "hedged") and rng.random() < 0.5:
        kw["max_coalesce"] = rng.choice([2, 4])
    n_data = rng.choice([1, 2, 3])
    modes = {}
    if queue_mode == "rr" and n_data > 1 and rng.random() < 0.6:
        modes["d0:1"] = "hang"                  # accepts calls, never answers
    fns = {f"b{i}:1": backup_fn for i in range(2)}
    from services.frontend.clock import ManualClock
    clock_box = {}

    e, clock, fleet = make_engine(mode, queue_mode, data=n_data, parity=1 if mode == "coded" else 0,
                                  backup=1 if mode == "cheap" else 0, fns=fns, modes=modes,
                                  decode_policy=decode_policy,
                                  observer=_LazyRecorder(clock_box), **kw)
    rec = Recorder(clock)
    clock_box["rec"] = rec
    assert isinstance(clock, ManualClock)
    e.start()
    queries = []
    inputs = {}
    for step in range(300):
        op = rng.random()
        if op < 0.35:
            x = np.asarray([rng.uniform(-5, 5) for _ in range(4)], dtype=np.float32)
            q = e.submit(x, f"q{len(queries)}", timeout_s=rng.choice([None, 0.001, 0.01, 0.3, 2.0]))
            inputs[q.request_id] = x
            queries.append(q)
        elif op < 0.63:
            client = rng.choice(list(fleet.clients.values()))
            if client.pending:
                client.release(rng.choice(client.pending_ids()))
        elif op < 0.70:
            client = rng.choice(list(fleet.clients.values()))
            if client.pending:
                client.fail(rng.choice(client.pending_ids()))
        elif op < 0.73:
            pending = [q for q in queries if not q.done]
            if pending:
                e.abandon(rng.choice(pending))          # the client went away (a sibling, often)
        elif op < 0.74:
            role = rng.choice(["data"] + (["parity"] if mode == "coded" else [])
                              + (["backup"] if mode == "cheap" else []))
            n = len(fleet.clients)
            fleet.fns[f"j{n}:1"] = backup_fn if role == "backup" else linear
            e.add_instance(f"j{n}", f"j{n}:1", role)    # a join at run time
        elif op < 0.765:
            # any instance may leave except the last data one (the last parity or backup may)
            spare = [i for i in e.instances.values() if i.role != "data" or len(e.by_role["data"]) > 1]
            if spare:
                await e.remove_instance(rng.choice(spare).instance_id)
        else:
            clock.advance(rng.choice([0.001, 0.004, 0.02, 0.1]))
        await settle(5)
    # let everything finish: keep answering what is pending, and move time on
    for _ in range(200):
        for client in fleet.clients.values():
            while client.pending:
                client.release()
        clock.advance(0.05)
        await settle(5)

    # --- every query done exactly once, nothing left anywhere
    assert all(q.done and q.future.done() for q in queries)
    assert e.in_system == 0
    assert e.in_flight() == 0
    assert sum(e.queue_depths().values()) == 0
    assert not e.groups, f"groups left: {list(e.groups)}"
    assert sorted(rec.done) == sorted(q.qid for q in queries)
    assert set(rec.done.values()) <= {1}, "a query was recorded done twice"
    c = e.counters
    assert c["admitted"] == len(queries)
    assert c["answered"] + c["failed"] + c["deadline_exceeded"] + c["abandoned"] == len(queries)
    assert c["groups"] == c["groups_finished"] + c["groups_abandoned"]

    # --- values, sources, and no answer past its deadline
    for q in queries:
        assert q.answered_s <= q.deadline_s + 1e-9, (q.request_id, q.status, q.answered_s - q.deadline_s)
        if q.status == "DEADLINE_EXCEEDED":
            assert q.answered_s >= q.deadline_s - 1e-9
        if q.future.cancelled() or q.future.exception() is not None:
            assert q.status in ("CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE"), q.status
            continue
        assert q.status == "OK"
        a = q.future.result()
        want = linear(inputs[q.request_id][None])[0]
        if a.source == BACKUP:
            assert mode == "cheap"
            np.testing.assert_allclose(a.output, want * 0.5, rtol=1e-5, atol=1e-5)
        else:
            assert a.source in (ORIGINAL, RECONSTRUCTED)
            np.testing.assert_allclose(a.output, want, rtol=1e-4, atol=1e-4)
        if a.source == RECONSTRUCTED:
            assert mode == "coded"

    # --- no instance blamed for a client's deadline
    for call, ended_s, timeout, health in rec.failed_calls:
        if timeout and health:
            assert ended_s - call.started_s >= INSTANCE_TIMEOUT_S - 1e-9, \
                "an instance was marked failed by a call cut short by a client deadline"
        if not health:
            assert timeout and call.capped
    for inst in e.instances.values():
        blamed = sum(1 for call, _, _, health in rec.failed_calls if health and call.instance is inst)
        assert inst.errors == blamed

    # --- no group outlives its queries by more than the GC period
    for g, finished_s, reason in rec.groups:
        done = [q.answered_s for m in g.members for q in m.queries]
        settled_s = max(done + [g.formed_s + kw["group_timeout_s"]])
        assert finished_s - settled_s <= GC_INTERVAL_S + 1e-9, (g.group_id, reason, finished_s - settled_s)
    await e.close()


class _LazyRecorder(NullObserver):
    """Forwards to the Recorder created once the engine's clock exists."""

    def __init__(self, box):
        self.box = box

    def __getattribute__(self, name):
        if name in ("box", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        rec = object.__getattribute__(self, "box").get("rec")
        if rec is None:
            return lambda *a, **kw: None
        return getattr(rec, name)
