"""The open-loop sender: queries leave on a Poisson schedule, whatever the
frontend does.

Algorithm: one *pacer* coroutine walks the precomputed ``Schedule``. For
arrival ``i`` it sleeps until ``t0 + times_s[i]`` on the injected monotonic
clock, then starts query ``i`` as its own task and moves on without waiting
for it. Each query task calls the transport (``call``) with the per-query
deadline and writes exactly one ``Record``.

Invariants:

1. Arrivals are absolute: the target time of query ``i`` is ``t0 +
   times_s[i]``, fixed before the first send (``loadgen.schedule``). A late
   pacer (a busy event loop, an overloaded client machine) sends at once and
   the lateness does not accumulate into later arrivals.
2. Nothing the frontend does slows the pacer: it never awaits a query; the
   number of outstanding queries is unbounded by design and bounded in
   practice by ``rate * deadline_s`` because every query ends by its
   deadline.
3. Every query that was sent ends in exactly one record: ``OK``, the gRPC
   status code name of its error, or ``CANCELLED`` when the run was stopped
   while it was outstanding. Queries not yet sent when a run is stopped have
   no record.
4. ``send_lag_ms`` = actual send time - scheduled time (>= 0 up to clock
   resolution); it is recorded per query so an overloaded sender is visible.
   ``latency_ms`` runs from the actual send to the answer.
5. The first ``schedule.num_warmup`` queries are flagged ``warmup`` and are
   otherwise sent exactly like the others (same rate, same transport).
6. The sender owns its tasks: when ``run`` returns or is cancelled, no query
   task is left running.

The transport is an interface: ``await call(request_id, x, timeout_s)``
returns a ``Reply`` or raises ``QueryFailed(status_name)``. The gRPC adapter
is ``loadgen.client``; tests may pass fakes. This module does not import
grpc.
"""

import asyncio
from dataclasses import dataclass

import numpy as np

from loadgen.records import Record
from services.common.clock import REAL as REAL_CLOCK


@dataclass(frozen=True)
class Reply:
    output: np.ndarray
    source: str
    batch_id: int = 0
    group_id: int = 0
    frontend_latency_ms: float = 0.0


class QueryFailed(Exception):
    """A query ended without an answer; ``status`` is the gRPC code name."""

    def __init__(self, status, message=""):
        super().__init__(f"{status}: {message}" if message else status)
        self.status = status


@dataclass
class Counters:
    total: int = 0
    sent: int = 0
    completed: int = 0
    errors: int = 0


class OpenLoopSender:
    """Sends the queries of one schedule open-loop; see the module docstring.

    Args:
        call: the transport, ``async (request_id, x, timeout_s) -> Reply``.
        schedule: ``loadgen.schedule.Schedule``.
        inputs: ndarray of shape (num_examples, *input_shape).
        labels: ndarray of shape (num_examples,), int.
        deadline_s: per-query deadline passed to ``call``.
        run_id, client_index: request ids are ``{run_id}-{client_index}-{i}``.
        clock: ``services.common.clock.Clock`` that paces the arrivals and
            times the queries (default the real one; tests inject a manual one).
    """

    def __init__(self, call, schedule, inputs, labels, *, deadline_s, run_id="run",
                 client_index=0, clock=None):
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self._call = call
        self._schedule = schedule
        self._inputs = inputs
        self._labels = np.asarray(labels)
        self._deadline_s = float(deadline_s)
        self._run_id = run_id
        self._client_index = int(client_index)
        self._clock = clock or REAL_CLOCK
        self._records = [None] * len(schedule)
        self._tasks = set()
        self.counters = Counters(total=len(schedule))

    @property
    def records(self):
        """Records of the queries sent so far, in schedule order."""
        return [r for r in self._records if r is not None]

    async def run(self):
        """Sends every query of the schedule, waits for all, returns records.

        Cancelling this coroutine (``Stop``) stops the pacer and cancels the
        outstanding queries, which are recorded as ``CANCELLED``; the records
        gathered so far stay available in ``self.records``.
        """
        t0 = self._clock.now()
        try:
            for i, at in enumerate(self._schedule.times_s):
                delay = t0 + at - self._clock.now()
                if delay > 0:
                    await self._clock.sleep(delay)
                now = self._clock.now()
                task = asyncio.create_task(self._one(i, now - t0, (now - t0 - at) * 1e3))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self.counters.sent += 1
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        return self.records

    async def _one(self, i, send_time_s, lag_ms):
        example = int(self._schedule.examples[i])
        request_id = f"{self._run_id}-{self._client_index}-{i}"
        record = Record(
            request_id=request_id, client_index=self._client_index, send_time_s=send_time_s,
            send_lag_ms=max(lag_ms, 0.0), latency_ms=0.0, status="CANCELLED", source="",
            predicted=-1, label=int(self._labels[example]), warmup=i < self._schedule.num_warmup,
        )
        start = self._clock.now()
        try:
            reply = await self._call(request_id, self._inputs[example], self._deadline_s)
        except QueryFailed as exc:
            record.status = exc.status
        else:
            record.status = "OK"
            record.source = reply.source
            record.predicted = int(np.argmax(reply.output)) if np.size(reply.output) else -1
            record.batch_id = int(reply.batch_id)
            record.group_id = int(reply.group_id)
            record.frontend_latency_ms = float(reply.frontend_latency_ms)
        finally:
            # Runs on cancellation too (status stays CANCELLED); the
            # CancelledError itself propagates.
            record.latency_ms = (self._clock.now() - start) * 1e3
            self._records[i] = record
            self.counters.completed += 1
            if record.status != "OK":
                self.counters.errors += 1
