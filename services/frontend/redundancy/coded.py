"""``coded``: k data batches + 1 parity batch per group; subtraction decoding.

Pinned buffers (``coding.CodingPools``, when given and the coder writes into
a caller's buffer): the parity batch's inputs are encoded into a pooled
buffer that the parity batch owns (``batch.buffer``) until its group finishes
or is abandoned (``on_group_done``); a reconstruction is decoded into a
pooled buffer that the group owns (``group.rec_buffer``) until it finishes,
or only until the member's original arrives (it wins, or it has been scored
against the reconstruction: nothing reads the buffer after that). A
reconstructed answer carries a copy of its row, never a view of the buffer.
An executor job owns its buffer until its kernel returns, even when the
awaiting task is cancelled (``CodingPools.release_after``). A failed encode
or decode releases at once. No buffer (pool exhausted): the kernel allocates
(``coding_pool_misses``).
"""

import asyncio
import logging
import time

import numpy as np

from services.frontend.records import ORIGINAL, RECONSTRUCTED, Batch, Group
from services.frontend.redundancy.lateness import Lateness
from services.frontend.redundancy.replication import Replication

log = logging.getLogger(__name__)


class Coded(Replication):
    """``coded``: k data batches + 1 parity batch per group; subtraction decoding.

    Algorithm (see the engine docstring for the group invariants):
    * ``on_batch``: the batch joins the forming group g as member i, gets id
      g(k+1)+i, and is queued for data instances at once. The first member
      starts the group timer. With k members the group is sealed: the parity
      batch (row r encodes row r of each member) is encoded, serialised and
      queued for parity instances. A group sealed by its timer with fewer than
      k members is partial: it gets no parity batch, unless padding is on.
    * Padding (``zero_output`` given, the frontend's default): a partial group
      is coded as if its missing members were batches of zeros, whose outputs
      are known without a call (every row is ``zero_output``, the deployed
      model's output for a zero input). Its parity batch encodes the real
      members and zero batches; a missing real member decodes from the parity,
      the other real outputs and the zero outputs. The group timer is then not
      ``group_timeout_s`` but ``lateness.group_wait_s()`` (the lateness
      threshold minus the median data-batch latency, at most
      ``group_timeout_s``): a group stops waiting for members when a later
      parity could no longer return before its first member is late. So at low
      load (members far apart) a query gets a parity of its own (k=2 concat
      on MNIST: 97.8 % top-1 reconstructing from a zero-padded parity, 98.1 %
      for the model), and at high load groups fill before the wait ends. The
      cost is parity calls: up to one per data batch instead of one per k.
      So a group pads only if its parity can start at once (``has_idle_instance``:
      no parity batch queued, a parity instance idle); else it goes on waiting
      for members up to ``group_timeout_s`` as without padding
      (``padding_deferred``), since a queued padded parity would come too late
      and delay the full groups' parities behind it.
    * ``on_result`` (data): answers ``ORIGINAL``; the output is kept for
      decoding; with all k outputs in, a still-queued parity batch is removed.
      (parity): the parity output is kept. Either way, when exactly k-1 data
      outputs and the parity output are in, the missing member is decoded at
      once (it is cheap), and the reconstruction is offered to the decode
      policy (``lateness.Lateness``): ``immediate`` answers at once (the
      paper); ``late`` holds it until the member is late (formed longer ago
      than the adaptive threshold), or just before a waiting query's deadline,
      or until the member's original can no longer arrive. When it answers,
      the member is removed from its queue if still queued (only it) and its
      unanswered queries get ``RECONSTRUCTED``. If the original arrives while
      the reconstruction is held, the original answers and the reconstruction
      is discarded; an original arriving after the reconstruction answered is
      recorded against it (``late_original``).
    * ``on_failure``: an erasure. Decoding happens as soon as the group allows;
      meanwhile a needed batch with no copy left is re-dispatched. A data batch
      whose attempts are spent waits for its decode while the decode is still
      possible (the parity and every other member answered or may answer),
      bounded by its queries' deadlines; once it is not (the parity or a second
      member is lost, the group sealed partial, the encode failed), it fails
      UNAVAILABLE at once.
    * ``needed``: a data batch is needed while one of its queries waits, or
      while a sibling's decode may still need its output (so cancelling a
      member's queries does not drop what its sibling needs). A parity batch
      is needed while some member without an output has a waiting query.
    * ``deadline_s``: a call of any batch of a group that is (or may become)
      coded serves up to the latest deadline of the group's queries; in a
      partial or uncoded group, up to its own queries'.

    Args:
        k: data batches per group.
        coder: ``coding.LocalCoder`` / ``coding.RemoteCoder``.
        lateness: the decode policy (``lateness.Lateness``; default ``late``).
        pools: ``coding.CodingPools`` for parity inputs and reconstructions, or
            None (the kernels allocate). Used only with a coder that
            ``accepts_out``.
        zero_output: the deployed model's output for one all-zero input row
            (ndarray of the output shape), which turns padding on; None: a
            partial group stays uncoded (the paper's behaviour).
    """

    mode = "coded"
    roles = ("data", "parity")
    pads_batches = True
    coalescing = False      # a group's batches must stay on separate calls

    def __init__(self, k, coder, lateness=None, pools=None, zero_output=None):
        super().__init__()
        if coder is None:
            raise ValueError("coded mode needs a coder")
        self.k = int(k)
        self.zero_output = None if zero_output is None else np.asarray(zero_output, dtype=np.float32)
        self._zeros = {}                # (kind, shape) -> read-only zero input / zero output batch
        self.coder = coder
        self.pools = pools if getattr(coder, "accepts_out", False) else None
        self.lateness = lateness if lateness is not None else Lateness()
        self.current = None
        self._group_ids = 0

    def attach(self, host):
        super().attach(host)
        self.lateness.attach(host)

    def gauges(self):
        gauges = self.lateness.gauges()
        if self.zero_output is not None:
            gauges["group_wait_s"] = self._group_wait_s()
        return gauges

    # --- grouping
    def on_batch(self, batch):
        h = self.host
        g = self.current
        if g is None:
            g = self.current = Group(self._group_ids, self.k, h.clock.now())
            self._group_ids += 1
            h.open_group(g)
            g.timer = h.clock.call_later(self._group_wait_s(), self._expire, g)
        i = len(g.members)
        batch.group = g
        batch.index = i
        batch.group_id = g.group_id
        batch.batch_id = g.group_id * (self.k + 1) + i
        g.members.append(batch)
        h.enqueue(batch)
        if len(g.members) == self.k:
            self._seal(g, full=True)

    def _group_wait_s(self):
        wait = self.lateness.group_wait_s() if self.zero_output is not None else None
        return self.host.group_timeout_s if wait is None else min(wait, self.host.group_timeout_s)

    def _zero(self, kind, shape):
        """A read-only batch of zeros (kind "input") or of zero outputs (kind "output"), cached."""
        z = self._zeros.get((kind, shape))
        if z is None:
            if kind == "input":
                z = np.zeros(shape, dtype=np.float32)
            else:
                z = np.ascontiguousarray(np.broadcast_to(self.zero_output, shape), dtype=np.float32)
            z.setflags(write=False)
            self._zeros[(kind, shape)] = z
        return z

    def _expire(self, g):
        g.timer = None
        if self.current is not g:
            return
        h = self.host
        rest = g.formed_s + h.group_timeout_s - h.clock.now()
        if self.zero_output is not None and rest > 0 and not h.has_idle_instance("parity"):
            # No parity call could start now: a padded parity would queue behind the
            # others (delaying them) and come too late. Keep waiting for members, as
            # without padding, up to the group timeout.
            h.counters["padding_deferred"] += 1
            g.timer = h.clock.call_later(rest, self._expire, g)
            return
        self._seal(g, full=False)

    def _seal(self, g, full):
        h = self.host
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        if self.current is g:
            self.current = None
        g.sealed = True
        g.sealed_s = h.clock.now()
        g.late_threshold_s = self.lateness.threshold_s()
        if not full:
            h.counters["partial_groups"] += 1
        if ((full or self.zero_output is not None) and h.has_role("parity")
                and any(m.needed() for m in g.members)):
            if not full:
                g.padded = True
                h.counters["padded_groups"] += 1
            self._encode(g)
        self._recheck(g)
        h.maybe_finish_group(g)

    # --- encoding
    def _acquire(self, kind, shape):
        """A pooled buffer for a result of ``shape``, or None (no pool, or a miss: allocate)."""
        if self.pools is None:
            return None
        buf = self.pools.acquire(kind, shape)
        if buf is None:
            self.host.counters["coding_pool_misses"] += 1
        return buf

    def _release(self, kind, buf):
        if buf is not None:
            self.pools.release(kind, buf)

    def _encode(self, g):
        h = self.host
        coder = self.coder
        t0 = time.perf_counter()        # ENCODING_LATENCY: gather + kernel + serialisation
        inputs = [m.inputs for m in g.members]
        inputs += [self._zero("input", inputs[0].shape)] * (self.k - len(inputs))   # padded
        nbytes = sum(x.nbytes for x in inputs)
        buf = self._acquire("parity", inputs[0].shape)
        if coder.inline(nbytes):
            try:
                parity_in = coder.encode_now(inputs) if buf is None else coder.encode_now(inputs, buf)
                parity = self._parity_batch(g, parity_in, buf)
            except Exception:  # noqa: BLE001 - a failed encode leaves the group uncoded
                self._release("parity", buf)
                h.counters["encode_errors"] += 1
                log.exception("encoding group %d failed", g.group_id)
                g.encode_failed = True
                return
            self._encoded(g, parity, time.perf_counter() - t0)
        else:
            g.encoding = True
            h.spawn(self._encode_async(g, inputs, t0, buf))

    async def _encode_async(self, g, inputs, t0, buf):
        h = self.host
        try:
            if buf is None:
                parity_in = await self.coder.encode(inputs)
            else:
                job = self.coder.encode_job(inputs, buf)
                try:
                    parity_in = await asyncio.shield(job)
                except asyncio.CancelledError:
                    self.pools.release_after(job, "parity", buf)    # the kernel may still write
                    raise
            parity = self._parity_batch(g, parity_in, buf)
        except Exception:  # noqa: BLE001 - a failed encode leaves the group uncoded
            self._release("parity", buf)                            # the job has ended
            h.counters["encode_errors"] += 1
            log.exception("encoding group %d failed", g.group_id)
            g.encoding = False
            g.encode_failed = True
            self._recheck(g)
            h.maybe_finish_group(g)
            return
        g.encoding = False
        if g.finished:                  # abandoned while encoding: nobody will send the parity
            self._release("parity", buf)
            return
        self._encoded(g, parity, time.perf_counter() - t0)
        self._recheck(g)
        h.maybe_finish_group(g)

    def _parity_batch(self, g, parity_in, buf=None):
        parity = Batch(g.group_id * (self.k + 1) + self.k, "parity", [], np.asarray(parity_in),
                       self.host.clock.now())
        parity.buffer = buf         # owned until the group finishes (on_group_done)
        parity.group = g
        parity.group_id = g.group_id
        parity.index = self.k
        parity.seq = g.members[-1].seq
        self.host.prepare(parity)  # serialisation is part of the encode step
        return parity

    def _encoded(self, g, parity, seconds):
        h = self.host
        g.encode_us = seconds * 1e6
        g.parity = parity
        g.coded = True
        h.counters["encodes"] += 1
        h.observer.encoded(seconds)
        if self.needed(parity):
            h.enqueue(parity)

    # --- replies
    def on_result(self, batch, output, instance):
        h = self.host
        g = batch.group
        if batch.role == "parity":
            if g.parity_output is None:
                batch.output = output
                batch.answered_s = h.clock.now()
                g.parity_output = output
                self._try_decode(g)
            return
        if batch.output is not None:
            return
        now = h.clock.now()
        batch.output = output
        batch.answered_s = now
        g.outputs[batch.index] = output
        g.n_outputs += 1
        self.lateness.observe(batch, now)
        self.lateness.cancel(batch)         # a held reconstruction is discarded: the original wins
        answered = h.answer_batch(batch, output, ORIGINAL, instance.instance_id)
        if g.missing == batch.index and answered < len(batch.queries):
            h.late_original(batch, batch.reconstruction, batch.reconstructed_s)
        if g.decoded == batch.index:
            self._drop_reconstruction(g, batch)     # discarded or scored: nothing reads it now
        if g.n_outputs == len(g.members) and g.parity is not None:
            h.remove_from_queue(g.parity)
        self._try_decode(g)

    def needed(self, batch):
        g = batch.group
        if batch.role == "parity":
            return any(m.output is None and m.needed() for m in g.members)
        if batch.needed():
            return True
        # kept while a sibling's decode may still need this batch's output
        return (g is not None and batch.output is None and g.decoded is None and self._parity_possible(g)
                and any(m is not batch and m.output is None and m.needed() for m in g.members))

    def deadline_s(self, batch):
        g = batch.group
        if g is None or (g.sealed and not g.coded and not g.encoding):
            return super().deadline_s(batch)        # no decode will need it: its own queries
        qs = [q for m in g.members for q in m.queries]
        return max(q.deadline_s for q in qs) if qs else None

    def related(self, batch):
        g = batch.group
        if g is None:
            return (batch,)
        return tuple(g.members) + ((g.parity,) if g.parity is not None else ())

    def on_failure(self, batch, instance, exc):
        if (batch.held is not None and not batch.calls and batch.queue is None
                and batch.attempts >= self.host.max_attempts):
            self.lateness.release(batch)        # the original cannot come: the reconstruction answers
            self._recheck(batch.group)
            return
        self._failure(batch, exc)
        self.lateness.orphaned(batch)           # a held reconstruction answers if the original cannot

    def _failure(self, batch, exc):
        g = batch.group
        if batch.calls or batch.queue is not None:
            return                              # another copy is on its way
        if self.needed(batch):
            if batch.attempts < self.host.max_attempts:
                self.host.retry(batch, exc)
                return
            batch.error = exc
            if batch.role == "data" and batch.needed() and self._decode_possible(g, batch):
                self.host.counters["awaiting_decode"] += 1     # bounded by its deadlines
            elif batch.role == "data":
                self.host.retry(batch, exc)     # spent: fails UNAVAILABLE
        self._recheck(g)

    def on_dropped(self, batch, exc):
        if batch.role == "data":
            if batch.held is not None:
                self.lateness.orphaned(batch)   # its reconstruction answers instead
            else:
                super().on_dropped(batch, exc)
        batch.error = exc
        self._recheck(batch.group)

    # --- can a decode still happen?
    @staticmethod
    def _alive(b):
        return b.output is not None or b.calls > 0 or b.queue is not None

    def _parity_possible(self, g):
        if g.decode_failed:
            return False                        # a decode error is final for the group
        if not g.sealed:
            return True                         # may still fill up and be encoded
        if g.encoding:
            return True
        if g.parity_output is not None:
            return True
        return g.parity is not None and self._alive(g.parity)

    def _decode_possible(self, g, member):
        """Can ``member`` still be reconstructed (parity and every other member alive)?"""
        if g is None or g.decoded is not None or not self._parity_possible(g):
            return False
        if g.sealed and len(g.members) < self.k and not g.padded:
            return False
        return all(self._alive(m) for m in g.members if m is not member)

    def _recheck(self, g):
        """Fails the spent members of ``g`` whose decode is no longer possible."""
        if g is None:
            return
        for m in g.members:
            if (m.output is None and m.error is not None and m.needed() and not m.calls
                    and m.queue is None and m.attempts >= self.host.max_attempts
                    and not self._decode_possible(g, m)):
                self.host.retry(m, m.error)     # attempts spent: fails UNAVAILABLE

    # --- decoding
    def _try_decode(self, g):
        if (not g.coded or g.parity_output is None or g.n_outputs != len(g.members) - 1
                or g.decoded is not None or g.decoding):
            return
        j = next(i for i, o in enumerate(g.outputs) if o is None)
        if not g.members[j].needed():
            return
        t0 = time.perf_counter()        # DECODING_LATENCY: gather + kernel
        available = [o for o in g.outputs if o is not None]
        # a padded group's zero members: their outputs are known
        available += [self._zero("output", g.parity_output.shape)] * (self.k - len(g.members))
        h = self.host
        coder = self.coder
        buf = self._acquire("reconstruction", g.parity_output.shape)
        if coder.inline(g.parity_output.nbytes * self.k):
            try:
                rec = (coder.decode_now(g.parity_output, available) if buf is None
                       else coder.decode_now(g.parity_output, available, buf))
            except Exception:  # noqa: BLE001 - a failed decode leaves re-dispatch to work
                self._release("reconstruction", buf)
                h.counters["decode_errors"] += 1
                log.exception("decoding group %d failed", g.group_id)
                g.decode_failed = True
                self._recheck(g)
                return
            self._decoded(g, j, rec, time.perf_counter() - t0, buf)
        else:
            g.decoding = True
            h.spawn(self._decode_async(g, j, available, t0, buf))

    async def _decode_async(self, g, j, available, t0, buf):
        h = self.host
        try:
            if buf is None:
                rec = await self.coder.decode(g.parity_output, available)
            else:
                job = self.coder.decode_job(g.parity_output, available, buf)
                try:
                    rec = await asyncio.shield(job)
                except asyncio.CancelledError:
                    self.pools.release_after(job, "reconstruction", buf)    # the kernel may still write
                    raise
        except Exception:  # noqa: BLE001 - a failed decode leaves re-dispatch to work
            self._release("reconstruction", buf)                           # the job has ended
            h.counters["decode_errors"] += 1
            log.exception("decoding group %d failed", g.group_id)
            g.decoding = False
            g.decode_failed = True
            self._recheck(g)
            h.maybe_finish_group(g)
            return
        g.decoding = False
        self._decoded(g, j, rec, time.perf_counter() - t0, buf)
        h.maybe_finish_group(g)

    def _decoded(self, g, j, rec, seconds, buf=None):
        h = self.host
        g.decode_us = seconds * 1e6
        h.counters["decodes"] += 1
        h.observer.decoded(seconds)
        member = g.members[j]
        if member.output is not None or g.finished:
            self._release("reconstruction", buf)
            return  # the original won the race with an off-loop decode (or the group was abandoned)
        g.rec_buffer = buf          # owned by the group until it finishes or the original arrives
        g.decoded = j
        g.decoded_s = h.clock.now()
        g.late_threshold_s = self.lateness.threshold_s()
        self.lateness.offer(member, lambda waited_s: self._answer_reconstructed(g, member, rec, waited_s))

    def _answer_reconstructed(self, g, member, rec, waited_s):
        """The decode policy lets ``member``'s reconstruction answer now."""
        h = self.host
        g.missing = member.index
        member.reconstruction = rec
        member.reconstructed_s = h.clock.now()
        h.remove_from_queue(member)
        # a pooled reconstruction is reused after the group: answers get copies of their rows
        if h.answer_batch(member, rec, RECONSTRUCTED, waited_s=waited_s, copy=g.rec_buffer is not None):
            h.counters["reconstructions"] += 1
        h.release(member)

    def _drop_reconstruction(self, g, member):
        """The reconstruction of ``member`` is no longer read: its pooled buffer goes back."""
        buf = g.rec_buffer
        if buf is not None:
            g.rec_buffer = None
            member.reconstruction = None
            self.pools.release("reconstruction", buf)

    def on_group_done(self, g, reason):
        """The group finished or was abandoned: its pooled buffers go back."""
        for m in g.members:
            self.lateness.cancel(m)     # abandoned with a held reconstruction: it never answers
        parity = g.parity
        if parity is not None and parity.buffer is not None:
            buf, parity.buffer = parity.buffer, None
            self.pools.release("parity", buf)
        if g.decoded is not None:
            self._drop_reconstruction(g, g.members[g.decoded])
