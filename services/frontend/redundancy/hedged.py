"""``hedged``: N + N/k replicas of F; a late batch gets a second copy."""

from services.frontend.latency import LatencyWindow
from services.frontend.redundancy.replication import Replication


class Hedged(Replication):
    """``hedged``: N + N/k replicas of F; a late batch gets a second copy.

    Algorithm: like ``none``; when a batch's first call starts, a timer of the
    hedge delay (``delay_s`` if fixed, else the p95 of the last 1000 data-call
    latencies, recomputed every 50, and ``initial_delay_s`` until 20 are known)
    is set. If it fires while the batch is unanswered, in flight and not
    queued, a copy is queued at the front, excluded from the instance already
    running it. The first reply answers; the timer is cancelled; a copy still
    queued is removed (only it). Each copy counts as an attempt.

    State owned here (nothing of it in the engine): the latency window and
    the delays.
    """

    mode = "hedged"

    def __init__(self, delay_s=None, initial_delay_s=0.05, window=None):
        super().__init__()
        self.delay_s = delay_s
        self.initial_delay_s = initial_delay_s
        self.latencies = window or LatencyWindow(size=1000, every=50, min_samples=20, quantile=0.95)

    def delay(self):
        """The hedge delay now (s)."""
        if self.delay_s is not None:
            return self.delay_s
        p95 = self.latencies.value()
        return self.initial_delay_s if p95 is None else p95

    def on_call_done(self, role, seconds):
        if role == "data":
            self.latencies.add(seconds)

    def on_dispatched(self, batch, instance):
        if batch.hedge_handle is None and batch.attempts == 1:
            batch.hedge_handle = self.host.clock.call_later(self.delay(), self._hedge, batch)

    def _hedge(self, batch):
        h = self.host
        if not batch.needed() or batch.queue is not None or not batch.calls:
            return
        if batch.attempts >= h.max_attempts:
            return
        if not h.can_copy(batch):
            return
        h.counters["hedges"] += 1
        h.enqueue(batch, front=True)

    def on_result(self, batch, output, instance):
        if batch.hedge_handle is not None:
            batch.hedge_handle.cancel()
        super().on_result(batch, output, instance)

    def gauges(self):
        return {"hedge_delay_s": self.delay()}
