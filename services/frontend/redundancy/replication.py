"""``none`` and ``equal``: the data queue only."""

from services.frontend.records import ORIGINAL


class Replication:
    """``none`` and ``equal``: data queue only.

    Algorithm: each batch gets the next batch id (its group id is the same:
    every batch is a trivial group) and goes to the data queue; the first reply
    answers its queries with ``ORIGINAL``. ``equal`` differs from ``none`` only
    in the deployment (N + N/k instances serving F), not in the frontend.
    An erasure of a batch that is still needed and has no copy queued or in
    flight is retried (``host.retry``).
    Caller guarantees: batches are data batches; every call on the loop thread.

    This class is also the base of the other policies: it implements every
    method of ``host.RedundancyPolicy`` with the plain behaviour.
    """

    mode = "none"
    roles = ("data",)
    pads_batches = False
    coalescing = True

    def __init__(self):
        self.host = None

    def attach(self, host):
        self.host = host

    def on_batch(self, batch):
        batch.batch_id = batch.group_id = self.host.new_batch_id()
        self.host.enqueue(batch)

    def on_dispatched(self, batch, instance):
        pass

    def on_result(self, batch, output, instance):
        if batch.output is not None:
            return
        batch.output = output
        batch.answered_s = self.host.clock.now()
        self.host.answer_batch(batch, output, ORIGINAL, instance.instance_id)

    def on_failure(self, batch, instance, exc):
        if self.needed(batch) and not batch.calls and batch.queue is None:
            self.host.retry(batch, exc)

    def on_dropped(self, batch, exc):
        if batch.role == "data":
            self.host.fail_batch(batch, exc)

    def on_call_done(self, role, seconds):
        pass

    def needed(self, batch):
        return batch.needed()

    def deadline_s(self, batch):
        qs = batch.queries
        return max(q.deadline_s for q in qs) if qs else None

    def related(self, batch):
        return (batch,) if batch.twin is None else (batch, batch.twin)

    def gauges(self):
        return {}
