"""Redundancy policies: what happens to a batch, its answers and its erasures.

Each policy is a small class; the engine calls, on the event loop thread:

* ``on_batch(batch)`` when a data batch has formed (assign ids, queue it and
  whatever redundancy goes with it);
* ``on_dispatched(batch, instance)`` when a call for it starts;
* ``on_result(batch, output, instance)`` when a call answered;
* ``on_failure(batch, instance, exc)`` when a call failed or timed out (an
  erasure); the default re-dispatches a batch that is still needed and has no
  other copy queued or in flight;
* ``needed(batch)``: may a queued batch still help? (the engine removes a
  queued batch once it is not).

A policy never blocks and never touches another thread.
"""

import logging
import time

import numpy as np

from services.frontend import engine as E

log = logging.getLogger(__name__)


class Replication:
    """``none`` and ``equal``: data queue only.

    Algorithm: each batch gets the next batch id (its group id is the same:
    every batch is a trivial group) and goes to the data queue; the first reply
    answers its queries with ``ORIGINAL``. ``equal`` differs from ``none`` only
    in the deployment (N + N/k instances serving F), not in the frontend.
    Caller guarantees: batches are data batches.
    """

    roles = ("data",)

    def __init__(self, engine):
        self.e = engine

    def on_batch(self, batch):
        batch.batch_id = batch.group_id = self.e.new_batch_id()
        self.e._enqueue(batch)

    def on_dispatched(self, batch, instance):
        pass

    def on_result(self, batch, output, instance):
        if batch.output is not None:
            return
        batch.output = output
        batch.answered_s = self.e.clock.now()
        self.e.answer_batch(batch, output, E.ORIGINAL, instance.instance_id)

    def on_failure(self, batch, instance, exc):
        if self.needed(batch) and not batch.calls and batch.queue is None:
            self.e.retry(batch, exc)

    def needed(self, batch):
        return batch.needed()


class Hedged(Replication):
    """``hedged``: N + N/k replicas of F; a late batch gets a second copy.

    Algorithm: like ``none``; when a batch's first call starts, a timer of
    ``hedge_delay`` (fixed, or the recent p95 of data-instance latency) is set.
    If it fires while the batch is unanswered, in flight and not queued, a
    copy is queued at the front, excluded from the instance already running it.
    The first reply answers; the timer is cancelled; a copy still queued is
    removed (only it). Each copy counts as an attempt.
    """

    def on_dispatched(self, batch, instance):
        if batch.hedge_handle is None and batch.attempts == 1:
            batch.hedge_handle = self.e.clock.call_later(self.e.hedge_delay(), self._hedge, batch)

    def _hedge(self, batch):
        e = self.e
        if not batch.needed() or batch.queue is not None or not batch.calls:
            return
        if batch.attempts >= e.max_attempts:
            return
        if not any(i.instance_id not in batch.exclude for i in e.by_role["data"]):
            return
        e.counters["hedges"] += 1
        e._enqueue(batch, front=True)

    def on_result(self, batch, output, instance):
        if batch.hedge_handle is not None:
            batch.hedge_handle.cancel()
        super().on_result(batch, output, instance)


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
    have exhausted their attempts.
    """

    roles = ("data", "backup")

    def on_batch(self, batch):
        e = self.e
        batch.batch_id = batch.group_id = e.new_batch_id()
        e._enqueue(batch)
        if e.has_role("backup") and batch.needed():
            twin = E.Batch(batch.batch_id, "backup", batch.queries, batch.inputs, batch.created_s)
            twin._payload = batch._payload
            twin.twin, batch.twin = batch, twin
            e._enqueue(twin)

    def on_result(self, batch, output, instance):
        e = self.e
        if batch.output is not None:
            return
        batch.output = output
        batch.answered_s = e.clock.now()
        source = E.ORIGINAL if batch.role == "data" else E.BACKUP
        answered = e.answer_batch(batch, output, source, instance.instance_id)
        twin = batch.twin
        if twin is None:
            return
        if batch.role == "data" and not answered and twin.output is not None:
            e.late_original(batch, twin.output, twin.answered_s)
        e._release_if_unneeded(twin)


class Coded(Replication):
    """``coded``: k data batches + 1 parity batch per group; subtraction decoding.

    Algorithm (see the engine docstring for the group invariants):
    * ``on_batch``: the batch joins the forming group g as member i, gets id
      g(k+1)+i, and is queued for data instances at once. The first member
      starts the group timer. With k members the group is sealed: the parity
      batch (row r encodes row r of each member) is encoded, serialised and
      queued for parity instances. A group sealed by its timer with fewer than
      k members is partial: it gets no parity batch.
    * ``on_result`` (data): answers ``ORIGINAL``; the output is kept for
      decoding; with all k outputs in, a still-queued parity batch is removed.
      (parity): the parity output is kept. Either way, when exactly k-1 data
      outputs and the parity output are in, the missing member is decoded,
      removed from its queue if still queued, and its unanswered queries get
      ``RECONSTRUCTED``. A late original is recorded against the reconstruction.
    * ``on_failure``: an erasure. Decoding happens as soon as the group allows;
      meanwhile a needed batch with no copy left is re-dispatched.
    """

    roles = ("data", "parity")

    def __init__(self, engine):
        super().__init__(engine)
        self.k = engine.k
        self.current = None
        self._group_ids = 0

    # --- grouping
    def on_batch(self, batch):
        e = self.e
        g = self.current
        if g is None:
            g = self.current = E.Group(self._group_ids, self.k, e.clock.now())
            self._group_ids += 1
            e.groups[g.group_id] = g
            e.counters["groups"] += 1
            g.timer = e.clock.call_later(e.group_timeout_s, self._expire, g)
        i = len(g.members)
        batch.group = g
        batch.index = i
        batch.group_id = g.group_id
        batch.batch_id = g.group_id * (self.k + 1) + i
        g.members.append(batch)
        e._enqueue(batch)
        if len(g.members) == self.k:
            self._seal(g, full=True)

    def _expire(self, g):
        g.timer = None
        if self.current is g:
            self._seal(g, full=False)

    def _seal(self, g, full):
        e = self.e
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        if self.current is g:
            self.current = None
        g.sealed = True
        if not full:
            e.counters["partial_groups"] += 1
        elif e.has_role("parity") and any(m.needed() for m in g.members):
            self._encode(g)
        e.maybe_finish_group(g)

    # --- encoding
    def _encode(self, g):
        e = self.e
        coder = e.coder
        t0 = time.perf_counter()        # ENCODING_LATENCY: gather + kernel + serialisation
        inputs = [m.inputs for m in g.members]
        nbytes = sum(x.nbytes for x in inputs)
        if coder.inline(nbytes):
            try:
                parity_in = coder.encode_now(inputs)
                parity = self._parity_batch(g, parity_in)
            except Exception:  # noqa: BLE001 - a failed encode leaves the group uncoded
                e.counters["encode_errors"] += 1
                log.exception("encoding group %d failed", g.group_id)
                return
            self._encoded(g, parity, time.perf_counter() - t0)
        else:
            g.encoding = True
            e._spawn(self._encode_async(g, inputs, t0))

    async def _encode_async(self, g, inputs, t0):
        e = self.e
        try:
            parity_in = await e.coder.encode(inputs)
            parity = self._parity_batch(g, parity_in)
        except Exception:  # noqa: BLE001 - a failed encode leaves the group uncoded
            e.counters["encode_errors"] += 1
            log.exception("encoding group %d failed", g.group_id)
            g.encoding = False
            e.maybe_finish_group(g)
            return
        g.encoding = False
        self._encoded(g, parity, time.perf_counter() - t0)
        e.maybe_finish_group(g)

    def _parity_batch(self, g, parity_in):
        parity = E.Batch(g.group_id * (self.k + 1) + self.k, "parity", [], np.asarray(parity_in),
                         self.e.clock.now())
        parity.group = g
        parity.group_id = g.group_id
        parity.index = self.k
        parity.payload()  # serialisation is part of the encode step
        return parity

    def _encoded(self, g, parity, seconds):
        e = self.e
        g.encode_us = seconds * 1e6
        g.parity = parity
        g.coded = True
        e.counters["encodes"] += 1
        e.obs.encoded(seconds)
        if self.needed(parity):
            e._enqueue(parity)

    # --- replies
    def on_result(self, batch, output, instance):
        e = self.e
        g = batch.group
        if batch.role == "parity":
            if g.parity_output is None:
                batch.output = output
                batch.answered_s = e.clock.now()
                g.parity_output = output
                self._try_decode(g)
            return
        if batch.output is not None:
            return
        batch.output = output
        batch.answered_s = e.clock.now()
        g.outputs[batch.index] = output
        g.n_outputs += 1
        answered = e.answer_batch(batch, output, E.ORIGINAL, instance.instance_id)
        if batch.reconstruction is not None and answered < len(batch.queries):
            e.late_original(batch, batch.reconstruction, batch.reconstructed_s)
        if g.n_outputs == self.k and g.parity is not None:
            e.remove_from_queue(g.parity)
        self._try_decode(g)

    def on_failure(self, batch, instance, exc):
        if self.needed(batch) and not batch.calls and batch.queue is None:
            self.e.retry(batch, exc)

    def needed(self, batch):
        if batch.role == "parity":
            return any(m.output is None and m.needed() for m in batch.group.members)
        return batch.needed()

    # --- decoding
    def _try_decode(self, g):
        if (not g.coded or g.parity_output is None or g.n_outputs != self.k - 1
                or g.missing is not None or g.decoding):
            return
        j = next(i for i, o in enumerate(g.outputs) if o is None)
        if j >= len(g.members) or not g.members[j].needed():
            return
        t0 = time.perf_counter()        # DECODING_LATENCY: gather + kernel
        available = [o for o in g.outputs if o is not None]
        e = self.e
        coder = e.coder
        if coder.inline(g.parity_output.nbytes * self.k):
            try:
                rec = coder.decode_now(g.parity_output, available)
            except Exception:  # noqa: BLE001 - a failed decode leaves re-dispatch to work
                e.counters["decode_errors"] += 1
                log.exception("decoding group %d failed", g.group_id)
                return
            self._decoded(g, j, rec, time.perf_counter() - t0)
        else:
            g.decoding = True
            e._spawn(self._decode_async(g, j, available, t0))

    async def _decode_async(self, g, j, available, t0):
        e = self.e
        try:
            rec = await e.coder.decode(g.parity_output, available)
        except Exception:  # noqa: BLE001 - a failed decode leaves re-dispatch to work
            e.counters["decode_errors"] += 1
            log.exception("decoding group %d failed", g.group_id)
            g.decoding = False
            e.maybe_finish_group(g)
            return
        g.decoding = False
        self._decoded(g, j, rec, time.perf_counter() - t0)
        e.maybe_finish_group(g)

    def _decoded(self, g, j, rec, seconds):
        e = self.e
        g.decode_us = seconds * 1e6
        e.counters["decodes"] += 1
        e.obs.decoded(seconds)
        member = g.members[j]
        if member.output is not None:
            return  # the original won the race with an off-loop decode
        g.missing = j
        member.reconstruction = rec
        member.reconstructed_s = e.clock.now()
        e.remove_from_queue(member)
        if e.answer_batch(member, rec, E.RECONSTRUCTED):
            e.counters["reconstructions"] += 1


def make_redundancy_policy(mode, engine):
    if mode in ("none", "equal"):
        return Replication(engine)
    if mode == "coded":
        return Coded(engine)
    if mode == "cheap":
        return Cheap(engine)
    if mode == "hedged":
        return Hedged(engine)
    raise ValueError(f"unknown mode {mode!r}")
