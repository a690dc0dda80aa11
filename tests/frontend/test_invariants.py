"""Randomised event sequences against the engine's invariants (docstring of engine.py).

Each seed drives one mode and queue mode through a random mix of arrivals,
replies, failures and clock advances (which fire batch/group/hedge/call/query
timers), then lets everything time out. Afterwards: every query is done
exactly once, nothing is in the system, in flight, queued or in the group
table, and every answer has the value its source promises (the model is
linear, so reconstructions are exact up to float rounding).
"""

import random

import numpy as np
import pytest

from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED
from tests.frontend.fakes import linear, settle
from tests.frontend.test_engine import make_engine

pytestmark = pytest.mark.timeout(120)

MODES = ["none", "coded", "cheap", "hedged"]


def backup_fn(a):
    return linear(a) * 0.5


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("PARM_INVARIANT_SEEDS", "24"))))
async def test_random_events_keep_the_invariants(seed):
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    queue_mode = ["single_queue", "rr"][(seed // len(MODES)) % 2]
    k = rng.choice([2, 3])
    batch_size = rng.choice([1, 1, 2, 3])
    kw = dict(k=k, batch_size=batch_size, batch_timeout_s=0.005, group_timeout_s=0.05,
              instance_timeout_s=0.2, query_timeout_s=1.0, max_attempts=rng.choice([1, 2, 3]),
              max_in_flight=rng.choice([1, 2]), gc_interval_s=0.5)
    if mode == "hedged":
        kw["hedge_delay_s"] = 0.02
    if mode in ("none", "cheap", "hedged") and rng.random() < 0.5:
        kw["max_coalesce"] = rng.choice([2, 4])
    fns = {f"b{i}:1": backup_fn for i in range(2)}
    e, clock, fleet = make_engine(mode, queue_mode, data=rng.choice([1, 2, 3]),
                                  parity=1 if mode == "coded" else 0,
                                  backup=1 if mode == "cheap" else 0, fns=fns, **kw)
    e.start()
    queries = []
    inputs = {}
    for step in range(300):
        op = rng.random()
        if op < 0.35:
            x = np.asarray([rng.uniform(-5, 5) for _ in range(4)], dtype=np.float32)
            q = e.submit(x, f"q{len(queries)}", timeout_s=rng.choice([None, 0.3, 2.0]))
            inputs[q.request_id] = x
            queries.append(q)
        elif op < 0.65:
            client = rng.choice(list(fleet.clients.values()))
            if client.pending:
                client.release(rng.choice(client.pending_ids()))
        elif op < 0.72:
            client = rng.choice(list(fleet.clients.values()))
            if client.pending:
                client.fail(rng.choice(client.pending_ids()))
        elif op < 0.73:
            pending = [q for q in queries if not q.done]
            if pending:
                e.abandon(rng.choice(pending))          # the client went away
        elif op < 0.74:
            role = rng.choice(["data"] + (["parity"] if mode == "coded" else [])
                              + (["backup"] if mode == "cheap" else []))
            n = len(fleet.clients)
            fleet.fns[f"j{n}:1"] = backup_fn if role == "backup" else linear
            e.add_instance(f"j{n}", f"j{n}:1", role)    # a join at run time
        elif op < 0.76:
            spare = [i for i in e.instances.values() if len(e.by_role[i.role]) > 1]
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

    assert all(q.done and q.future.done() for q in queries)
    assert e.in_system == 0
    assert e.in_flight() == 0
    left = [(b.batch_id, b.role, b.calls, b.attempts, sorted(b.exclude), [q.done for q in b.queries])
            for q_ in getattr(e.queue, "_queues", {}).values() for b in q_]
    assert sum(e.queue_depths().values()) == 0, left
    assert not e.groups, f"groups left: {list(e.groups)}"
    c = e.counters
    assert c["admitted"] == len(queries)
    assert c["answered"] + c["failed"] + c["deadline_exceeded"] + c["abandoned"] == len(queries)
    assert c["groups"] == c["groups_finished"] + c["groups_abandoned"]
    for q in queries:
        if q.future.cancelled() or q.future.exception() is not None:
            continue
        a = q.future.result()
        want = linear(inputs[q.request_id][None])[0]
        if a.source == BACKUP:
            np.testing.assert_allclose(a.output, want * 0.5, rtol=1e-5, atol=1e-5)
        else:
            assert a.source in (ORIGINAL, RECONSTRUCTED)
            np.testing.assert_allclose(a.output, want, rtol=1e-4, atol=1e-4)
        if a.source == RECONSTRUCTED:
            assert mode == "coded"
    await e.close()
