"""When a substitute may answer for a data batch: the decode policy (``--decode-policy``).

A *substitute* is an answer that is not the deployed model's own output for
a data batch: the reconstruction of a coded group's member, or the backup
model's answer in cheap mode. Both modes share this one mechanism.

* ``immediate`` (the paper's rule): a substitute answers as soon as it exists.
* ``late`` (the default): a substitute answers only once the data batch is
  *late*: the time since the batch was formed exceeds the lateness threshold.
  If the original arrives first, it answers and the substitute is discarded
  (counter ``substitutes_discarded``). The threshold is the ``quantile``
  (default 0.95) of the recent formed-to-answered latencies of data batches
  whose original arrived (a sliding window of ``window`` samples, recomputed
  every ``every``), and ``initial_s`` until ``min_samples`` are in. A query's
  deadline wins: the substitute answers ``margin_s`` before the earliest
  deadline of the batch's waiting queries if that comes first. A held
  substitute also answers at once when the original can no longer arrive
  (the data batch is neither queued nor in flight: spent, dropped).

Invariants: a batch holds at most one substitute (``batch.held``) and one
timer (``batch.hold_handle``); exactly one of ``release`` (timer, orphaned,
deadline) and ``cancel`` (the original arrived) ends a hold. Everything runs
on the event loop thread.
"""

import math

from services.frontend.latency import LatencyWindow

DECODE_POLICIES = ("immediate", "late")


class Lateness:
    """The decode policy and its adaptive threshold (see the module docstring).

    Args:
        policy: "immediate" or "late".
        quantile: of recent data-batch formed-to-answered latencies, in (0, 1].
        initial_s: the threshold until ``min_samples`` latencies are known.
        window, every, min_samples: the sliding window.
        margin_s: how long before a query's deadline a held substitute answers.
    """

    def __init__(self, policy="late", *, quantile=0.95, initial_s=0.05, window=1000, every=50,
                 min_samples=20, margin_s=0.002):
        if policy not in DECODE_POLICIES:
            raise ValueError(f"unknown decode policy {policy!r} ({'|'.join(DECODE_POLICIES)})")
        self.policy = policy
        self.late = policy == "late"
        self.initial_s = initial_s
        self.margin_s = margin_s
        self.window = LatencyWindow(size=window, every=every, min_samples=min_samples, quantile=quantile)
        self.host = None

    def attach(self, host):
        self.host = host

    def threshold_s(self):
        """The lateness threshold now (s)."""
        value = self.window.value()
        return self.initial_s if value is None else value

    def group_wait_s(self):
        """How long a coding group may wait for its members so that its parity can still
        return before the first member is late: the threshold minus the median data-batch
        latency (a parity takes about as long), never below 0. None before ``min_samples``
        latencies (no basis yet: the caller keeps its own timeout)."""
        median = self.window.median()
        if median is None:
            return None
        return max(0.0, self.threshold_s() - median)

    def observe(self, batch, now_s):
        """A data batch's original arrived at ``now_s``: one latency sample."""
        self.window.add(now_s - batch.created_s)

    def due_s(self, batch):
        """When a substitute for ``batch`` may answer (absolute clock time)."""
        if not self.late:
            return -math.inf
        due = batch.created_s + self.threshold_s()
        live = [q.deadline_s for q in batch.queries if not q.done]
        if live:
            due = min(due, min(live) - self.margin_s)
        return due

    @staticmethod
    def original_may_arrive(batch):
        return batch.output is None and (batch.calls > 0 or batch.queue is not None)

    def offer(self, batch, answer):
        """A substitute for data batch ``batch`` exists; ``answer(waited_s)`` gives it.

        Called at once under ``immediate``, when the batch is late, just before a
        deadline, or when the original can no longer arrive, whichever is first.
        """
        h = self.host
        now = h.clock.now()
        self._end(batch)
        batch.held = (now, answer)
        due = self.due_s(batch)
        if due <= now or not self.original_may_arrive(batch):
            self.release(batch)
            return
        h.counters["held_for_lateness"] += 1
        batch.hold_handle = h.clock.call_later(due - now, self.release, batch)

    def release(self, batch):
        """Answers with the held substitute now (timer, deadline, orphaned)."""
        held = batch.held
        if held is None:
            return
        self._end(batch)
        since_s, answer = held
        answer(self.host.clock.now() - since_s)

    def cancel(self, batch):
        """The original arrived: a held substitute is discarded. True if one was."""
        if batch.held is None:
            return False
        self._end(batch)
        self.host.counters["substitutes_discarded"] += 1
        return True

    def orphaned(self, batch):
        """Releases a held substitute if the original can no longer arrive."""
        if batch.held is not None and not self.original_may_arrive(batch):
            self.release(batch)

    @staticmethod
    def _end(batch):
        handle = batch.hold_handle
        if handle is not None:
            handle.cancel()
            batch.hold_handle = None
        batch.held = None

    def gauges(self):
        return {"late_threshold_s": self.threshold_s()}
