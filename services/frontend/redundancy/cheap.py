"""``cheap``: every batch also goes to a backup model; the original is preferred."""

from services.frontend.records import BACKUP, ORIGINAL, Batch
from services.frontend.redundancy.lateness import Lateness
from services.frontend.redundancy.replication import Replication


class Cheap(Replication):
    """``cheap``: every batch also goes to the backup queue; the original is preferred.

    Algorithm: a data batch and its backup twin (same id, same queries, same
    input bytes, role ``backup``) are queued together. An original reply
    answers the queries ``ORIGINAL`` at once. A backup reply that comes first
    is a substitute, offered to the decode policy (``lateness.Lateness``, the
    same mechanism as coded mode's reconstructions): ``immediate`` answers
    ``BACKUP`` at once (first answer wins); ``late`` holds it until the data
    twin is late (formed longer ago than the adaptive threshold), or just
    before a waiting query's deadline, or until the data twin can no longer
    answer; an original arriving meanwhile answers and the backup answer is
    discarded. Replies are handled one at a time, so an original that has
    arrived has answered. Once the queries are answered the other twin, if
    still queued, is removed (only it); if in flight it runs on, and a late
    original is recorded against the backup answer. Erasures are
    re-dispatched; a batch fails only when both twins have exhausted their
    attempts; when one twin is dropped (its last instance left) while the
    other has spent its attempts, the queries fail at once.
    """

    mode = "cheap"
    roles = ("data", "backup")

    def __init__(self, lateness=None):
        super().__init__()
        self.lateness = lateness if lateness is not None else Lateness()

    def attach(self, host):
        super().attach(host)
        self.lateness.attach(host)

    def gauges(self):
        return self.lateness.gauges()

    def on_batch(self, batch):
        h = self.host
        batch.batch_id = batch.group_id = h.new_batch_id()
        h.enqueue(batch)
        if h.has_role("backup") and batch.needed():
            twin = Batch(batch.batch_id, "backup", batch.queries, batch.inputs, batch.created_s)
            twin.wire = batch.wire
            twin.seq = batch.seq
            twin.twin, batch.twin = batch, twin
            h.enqueue(twin)

    def on_result(self, batch, output, instance):
        h = self.host
        if batch.output is not None:
            return
        now = h.clock.now()
        batch.output = output
        batch.answered_s = now
        twin = batch.twin
        if batch.role == "data":
            self.lateness.observe(batch, now)
            self.lateness.cancel(batch)         # a held backup answer is discarded
            answered = h.answer_batch(batch, output, ORIGINAL, instance.instance_id)
            if twin is None:
                return
            if not answered and twin.output is not None:
                h.late_original(batch, twin.output, twin.answered_s)
            h.release(twin)
            return
        data = twin
        iid = instance.instance_id

        def answer(waited_s):
            h.answer_batch(batch, output, BACKUP, iid, waited_s=waited_s)
            if data is not None:
                h.release(data)

        if data is None or data.output is not None or not batch.needed():
            answer(None)
        else:
            self.lateness.offer(data, answer)

    def on_failure(self, batch, instance, exc):
        if (batch.role == "data" and batch.held is not None and not batch.calls and batch.queue is None
                and batch.attempts >= self.host.max_attempts):
            self.lateness.release(batch)        # the original cannot come: the backup answers
            return
        super().on_failure(batch, instance, exc)
        if batch.role == "data":
            self.lateness.orphaned(batch)       # the held backup answer goes now

    def on_dropped(self, batch, exc):
        twin = batch.twin
        if batch.role == "data":
            if batch.held is not None:
                self.lateness.orphaned(batch)   # the held backup answer goes now
            else:
                super().on_dropped(batch, exc)
            return
        if twin is None:
            return
        # The backup twin cannot run: if the data twin has nothing left either, fail now.
        if twin.needed() and not twin.calls and twin.queue is None and twin.output is None:
            self.host.retry(twin, exc)
