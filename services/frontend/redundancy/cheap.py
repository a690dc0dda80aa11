"""``cheap``: every batch also goes to a backup model; first answer wins."""

from services.frontend.records import BACKUP, ORIGINAL, Batch
from services.frontend.redundancy.replication import Replication


class Cheap(Replication):
    """``cheap``: every batch also goes to the backup queue; first answer wins.

    Algorithm: a data batch and its backup twin (same id, same queries, same
    input bytes, role ``backup``) are queued together. The first reply answers
    the queries, ``ORIGINAL`` from the data instance or ``BACKUP`` from the
    backup instance; the original is preferred whenever it is already there
    (replies are handled one at a time, so an original that has arrived has
    answered). The other twin, if still queued, is removed (only it); if in
    flight it runs on, and a late original is recorded against the backup
    answer. Erasures are re-dispatched; a batch fails only when both twins
    have exhausted their attempts; when one twin is dropped (its last instance
    left) while the other has spent its attempts, the queries fail at once.
    """

    mode = "cheap"
    roles = ("data", "backup")

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
        batch.output = output
        batch.answered_s = h.clock.now()
        source = ORIGINAL if batch.role == "data" else BACKUP
        answered = h.answer_batch(batch, output, source, instance.instance_id)
        twin = batch.twin
        if twin is None:
            return
        if batch.role == "data" and not answered and twin.output is not None:
            h.late_original(batch, twin.output, twin.answered_s)
        h.release(twin)

    def on_dropped(self, batch, exc):
        twin = batch.twin
        if batch.role == "data" or twin is None:
            super().on_dropped(batch, exc)
            return
        # The backup twin cannot run: if the data twin has nothing left either, fail now.
        if twin.needed() and not twin.calls and twin.queue is None and twin.output is None:
            self.host.retry(twin, exc)
