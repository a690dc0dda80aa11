"""The frontend's core: admission, batching, dispatch, recovery. No grpc here.

Concurrency model and invariants
--------------------------------
* One thread. Every method of ``Engine`` runs on the event loop thread
  (servicers call ``submit``; timers fire through the injected ``Clock``; call
  completions run in the tasks the engine spawned). Nothing is shared with
  another thread except the arrays handed to the coder executor, which are
  read-only for as long as the executor holds them. So there are no locks, and
  every state change below is atomic with respect to every other.
* Ownership of a query: from ``submit`` until it is *done* (answered, failed,
  or abandoned by its client) the query is counted in ``in_system``; exactly
  one of ``_answer`` / ``_fail`` / ``abandon`` marks it done (they check
  ``query.done`` first), decrements ``in_system`` and cancels its deadline
  timer. The first answer wins; later ones are only recorded.
* Ownership of a batch: a batch is forming (in the ``Batcher``), queued (in
  exactly one queue, ``batch.queue``), and/or in flight (``batch.calls`` live
  ``Call`` objects, each owning one slot of one instance). A batch may be both
  queued and in flight (a hedged copy, a re-dispatch after a timeout). A
  batch leaves a queue by being taken by an instance or by ``remove`` of
  exactly that batch; never by range. A query that is done before its batch
  forms leaves it; a batch with no live query is never formed.
* What cancels what: a query's end (answer, deadline, abandon) calls
  ``release`` on its batch, which unqueues every *related* batch (itself, its
  twin, its group's members and parity: ``policy.related``) that the policy
  no longer calls ``needed``. A batch taken from a queue that is not needed
  is dropped, not dispatched; a batch that is not needed is not queued again
  (retries, instances leaving). A call is never cancelled because its queries
  ended: it runs to its reply or its timeout, so a late original can still be
  recorded.
* Dispatch is least loaded first: an instance takes a call only when no other
  instance of its role that may take one has fewer calls in flight, so a second
  call (``max_in_flight`` > 1) is pipelined onto an instance only when every
  instance of the role is busy; it waits at the instance for the device.
* A call carries one batch, or with ``max_coalesce`` > 1 (not in coded mode)
  several batches of one role taken from the queue together by one free
  instance (dynamic batching under load); its reply is split back by rows in
  the order taken, and an error or timeout is an erasure of every batch in it.
* A call ends exactly once (``Call.finished``): by its reply, its error, its
  timeout timer, or its instance leaving. The end releases the instance slot
  and pumps the instance's queue. Every call has a timeout: the instance
  timeout, capped (``Call.capped``) by the latest deadline its batches can
  still serve (``policy.deadline_s``). Health: an error or the instance
  timeout is the instance's fault (backoff; in ``rr`` its queue moves to the
  live instances, oldest first); reaching the cap is the client's deadline,
  which ends the queries and leaves the instance's health untouched.
* Coding groups (coded mode): group g holds data batch ids g(k+1)..g(k+1)+k-1
  and parity id g(k+1)+k. A group is *sealed* when it has k data batches (then
  its parity batch is encoded and queued) or when its formation timer fires
  (a *partial* group: no parity, its batches served as in ``none`` mode and
  erasures re-dispatched; or, with padding, coded with zero batches in the
  missing places, whose outputs the policy knows: ``redundancy/coded.py``).
  When k of the k+1 batches (zero batches counted) have an original output
  and the missing one is data, the missing one is decoded at once and
  removed from its queue if still queued (only it). When all k data outputs are
  in, a still-queued parity batch is removed. A data batch with spent attempts
  waits for its decode while the decode is still possible, else fails. A
  group is *finished* when it is sealed, every member and the parity are
  neither queued nor in flight, and every query is done; then its record is
  written and it is dropped. Since nothing unneeded is dispatched and every
  call is capped, a group outlives its last query by at most one instance
  timeout. A sweep every ``gc_interval_s`` drops groups older than
  ``gc_horizon_s`` as abandoned, as a backstop.
* Pinned coding buffers (coded mode, ``coding.CodingPools``): a parity batch's
  inputs and a group's reconstruction may live in pooled buffers. The policy
  owns them and returns them in ``on_group_done``, which ``_finish_group``
  calls exactly once per group (complete, abandoned by the GC, or abandoned
  at ``close``), so ``close`` returns every buffer a group holds; a buffer an
  executor job is still writing goes back when that job ends (the pools'
  ``close`` waits for it). No answer references a pooled buffer.
* The policy boundary: the engine owns queries, batches, calls, instances and
  the group table; the redundancy policy (injected, ``redundancy/``) decides
  what a formed batch becomes and what a reply or an erasure means, and acts
  only through the public ``PolicyHost`` methods (``redundancy/host.py``).
  State only one policy needs (the hedge latency window, the forming group)
  lives in that policy.
* Nothing waits forever: a forming batch is flushed after ``batch_timeout_s``;
  a forming group is sealed after ``group_timeout_s``; a query without a
  client deadline gets ``query_timeout_s``; a failed call is retried at most
  ``max_attempts`` times per batch, on another instance where one exists.
"""

import asyncio
import itertools
import logging

import numpy as np

from services.common import tensors
from services.common.errors import DeadlineExceeded, InstanceFailed, InvalidInput, NoInstance, Overloaded
from services.frontend.batcher import Batcher
from services.frontend.instances import Instance, check_rows
from services.frontend.records import BACKUP, ORIGINAL, RECONSTRUCTED, Answer, Batch, Call, Query

log = logging.getLogger(__name__)

COUNTERS = (
    "admitted", "answered", "answered_original", "answered_reconstructed", "answered_backup",
    "failed", "deadline_exceeded", "abandoned", "rejected_invalid", "rejected_overloaded",
    "rejected_unavailable", "batches", "partial_batches", "groups", "partial_groups",
    "groups_finished", "groups_abandoned", "encodes", "encode_errors", "decodes", "decode_errors",
    "reconstructions", "redispatches", "hedges", "removed_from_queue", "calls", "call_errors",
    "call_timeouts", "late_originals", "instances_joined", "instances_left",
    "call_deadline_expired", "expired_forming", "skipped_unneeded", "dropped", "awaiting_decode",
    "held_for_lateness", "substitutes_discarded", "coding_pool_misses", "padded_groups", "padding_deferred",
)


class NullObserver:
    """Receives every record and metric event; the default does nothing."""

    def query_done(self, query, batch, group_id): ...
    def group_done(self, group, reason): ...
    def late_original(self, batch, delay_ms, max_abs_error, agree): ...
    def encoded(self, seconds): ...
    def decoded(self, seconds): ...
    def dispatched(self, batch, queue_s): ...
    def call_failed(self, call, exc, timeout, health): ...


class Engine:
    """Admission, batching, dispatch and recovery for one deployment.

    Implements ``redundancy.host.PolicyHost`` (the public methods a policy
    may call); everything whose name starts with ``_`` is the engine's own.

    Args:
        base: ``Manifest`` of the deployed model (validation, output shape).
        policy: the redundancy policy (``redundancy.make_policy``), built by
            the caller; the engine attaches itself to it as its host.
        queue: a queue policy (``queues.SingleQueue`` / ``RoundRobinQueues``).
        clock: ``Clock``.
        client_factory: ``address -> InstanceClient`` (a class with a
            ``prepare(batch)`` classmethod serialises parity batches at encode time).
        batch_size: queries per batch.
        *_s: timeouts in seconds (see the module docstring).
        max_in_system: admission bound (queries admitted and not yet done).
        max_in_flight: calls in flight per instance (1 here; the frontend's command line
            defaults to 2). Dispatch is least loaded first (``_pump``).
        max_coalesce: queued batches an instance may take in one call (1 = off;
            refused by policies whose batches must stay apart, e.g. coded).
        max_attempts: calls per batch before its queries fail.
        observer: receives records and metric events.
    """

    def __init__(self, *, base, policy, queue, clock, client_factory,
                 batch_size=1, batch_timeout_s=0.005, group_timeout_s=1.0,
                 instance_timeout_s=2.0, query_timeout_s=30.0, max_in_system=10000,
                 max_in_flight=1, max_coalesce=1, max_attempts=3,
                 parity_output_shape=None, backup_output_shape=None, observer=None,
                 gc_interval_s=1.0):
        self.base = base
        self.policy = policy
        self.mode = policy.mode
        self.batch_size = int(batch_size)
        self.queue = queue
        self.clock = clock
        self.client_factory = client_factory
        self.batch_timeout_s = batch_timeout_s
        self.group_timeout_s = group_timeout_s
        self.instance_timeout_s = instance_timeout_s
        self.query_timeout_s = query_timeout_s
        self.max_in_system = max_in_system
        self.max_in_flight = max_in_flight
        self.max_coalesce = max(1, int(max_coalesce))
        if not policy.coalescing and self.max_coalesce > 1:
            raise ValueError(f"coalescing is not available in {policy.mode} mode "
                             "(a group's batches must stay apart)")
        self.max_attempts = max_attempts
        self.observer = observer or NullObserver()
        self.input_shape = tuple(base.input_shape)
        self.input_dtype = np.dtype(base.input_dtype)
        self.output_shapes = {
            "data": tuple(base.output_shape),
            "parity": tuple(parity_output_shape or base.output_shape),
            "backup": tuple(backup_output_shape or base.output_shape),
        }
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.in_system = 0
        self.instances = {}                         # instance_id -> Instance
        self.by_role = {"data": [], "parity": [], "backup": []}
        self._rotation = {"data": 0, "parity": 0, "backup": 0}
        self.groups = {}                            # group_id -> Group (unfinished)
        self._qids = itertools.count()
        self._batch_ids = itertools.count()
        self._seqs = itertools.count()             # formation order of data batches (age)
        self._tasks = set()
        self._gc_interval_s = gc_interval_s
        self.gc_horizon_s = (group_timeout_s + query_timeout_s
                             + instance_timeout_s * (max_attempts + 1) + 1.0)
        self._gc_handle = None
        self._closed = False
        self.batcher = Batcher(self.batch_size, batch_timeout_s, clock, self._on_batch_formed)
        self._prepare = getattr(client_factory, "prepare", None)
        policy.attach(self)

    # ------------------------------------------------------------ lifecycle
    def start(self):
        """Starts the group garbage-collection sweep (needs the loop)."""
        if self._gc_handle is None and self._gc_interval_s:
            self._gc_handle = self.clock.call_later(self._gc_interval_s, self._gc)

    @property
    def closed(self):
        """True once ``close`` has begun (nothing new is admitted or queued)."""
        return self._closed

    async def close(self):
        """Fails every pending query, cancels calls, closes instance clients, abandons open groups."""
        self._closed = True
        if self._gc_handle is not None:
            self._gc_handle.cancel()
        self.batcher.flush()
        for inst in list(self.instances.values()):
            await self.remove_instance(inst.instance_id, reason="shutdown")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for g in list(self.groups.values()):
            self._finish_group(g, "abandoned")

    # ------------------------------------------------------------ instances
    def add_instance(self, instance_id, address, role, model=""):
        """Adds (or, on a changed address/role, replaces) an instance."""
        old = self.instances.get(instance_id)
        if old is not None:
            if old.address == address and old.role == role:
                return old
        inst = Instance(instance_id, address, role, self.client_factory(address), self.clock, model)
        self.instances[instance_id] = inst
        self.by_role[role].append(inst)
        if old is not None:     # after the new one is in, so the old one's erasures can go to it
            self._detach(old, "changed")
            self.spawn(self._close_client(old))
        self.counters["instances_joined"] += 1
        log.info("instance joined: %s %s %s", role, instance_id, address)
        self._pump(role)
        return inst

    async def remove_instance(self, instance_id, reason="left"):
        """Removes an instance: its calls become erasures, its rr queue is re-pushed."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return
        self._detach(inst, reason)
        await self._close_client(inst)

    def _detach(self, inst, reason):
        """Synchronous part of a removal: calls become erasures, queues move."""
        instance_id = inst.instance_id
        inst.removed = True
        self.by_role[inst.role].remove(inst)
        self.counters["instances_left"] += 1
        log.info("instance left (%s): %s %s", reason, inst.role, instance_id)
        # Its queue moves first (by age), then its calls are erased (retried at the front).
        self._requeue(self.queue.drain_instance(inst))
        for call in list(inst.calls):
            if call.task is not None:
                call.task.cancel()
            self._end_call_failed(call, InstanceFailed(f"instance {instance_id} {reason}"), timeout=False)
        if not self.by_role[inst.role]:
            self._role_gone(inst.role)
            return
        # A queued batch excluded from every instance left would never be taken:
        # a hedged copy (its original still runs) is dropped, a retry may go anywhere again.
        remaining = {i.instance_id for i in self.by_role[inst.role]}
        for batch in self.queue.queued(inst.role):
            if remaining <= batch.exclude:
                if batch.calls:
                    self.remove_from_queue(batch)
                else:
                    batch.exclude.clear()
        self._pump(inst.role)

    async def _close_client(self, inst):
        try:
            await inst.client.close()
        except Exception:  # noqa: BLE001 - closing a dead channel must not stop removal
            log.debug("closing client of %s", inst.instance_id, exc_info=True)

    def _role_gone(self, role):
        """No instance of ``role`` is left: its queued batches are dropped (the policy decides
        what that means: a data batch fails UNAVAILABLE, a parity batch leaves its group uncoded)."""
        for batch in self.queue.drain_role(role):
            self._drop(batch, NoInstance(f"no {role} instance is available"))

    def _requeue(self, batches):
        """Pushes ``batches`` (a drained queue, oldest first) again, oldest first, each into
        its new queue by age (so they are not served after younger batches, nor reversed)."""
        for batch in batches:
            self.enqueue(batch, where="age")

    def _drop(self, batch, exc):
        """``batch`` cannot be queued (no instance of its role, or shutting down)."""
        self.counters["dropped"] += 1
        self.policy.on_dropped(batch, exc)
        self._after_batch_event(batch)

    def has_role(self, role):
        return bool(self.by_role[role])

    def has_idle_instance(self, role):
        """True if a batch of ``role`` queued now would start at once on an idle device:
        none of the role is queued and one of its instances has no call in flight and is
        not backing off (a pipelined second call, ``max_in_flight`` > 1, would wait at its
        instance behind the first). With ``rr`` queues, where a batch goes to one
        instance's queue, an approximation."""
        if self.queue.depths().get(role, 0):
            return False
        now = self.clock.now()
        return any(i.in_flight == 0 and self._can_start(i, now) for i in self.by_role[role])

    def _can_start(self, inst, now):
        """``inst`` may take a call now: a free slot, and not backing off."""
        return inst.in_flight < self.max_in_flight and now >= inst.down_until_s

    # ------------------------------------------------------------ admission
    def validate(self, array):
        """Checks one example against the manifest; raises InvalidInput naming the problem."""
        if array.dtype != self.input_dtype:
            raise InvalidInput(
                f"input dtype is {array.dtype.name}, but model {self.base.name!r} expects "
                f"{self.input_dtype.name}")
        if array.shape != self.input_shape:
            raise InvalidInput(
                f"input shape is {list(array.shape)}, but model {self.base.name!r} expects "
                f"{list(self.input_shape)} (one example, no batch dimension)")

    def submit(self, array, request_id="", timeout_s=None):
        """Admits one example; returns the ``Query`` whose future gets an ``Answer``.

        Raises:
            InvalidInput, Overloaded, NoInstance: at once, nothing admitted.
        """
        try:
            self.validate(array)
        except InvalidInput:
            self.counters["rejected_invalid"] += 1
            raise
        if self.in_system >= self.max_in_system:
            self.counters["rejected_overloaded"] += 1
            raise Overloaded(f"frontend has {self.in_system} queries in the system "
                             f"(limit {self.max_in_system})")
        if not self.by_role["data"] or self._closed:
            self.counters["rejected_unavailable"] += 1
            raise NoInstance("no data instance is available")
        now = self.clock.now()
        limit = self.query_timeout_s if timeout_s is None else min(timeout_s, self.query_timeout_s)
        fut = asyncio.get_running_loop().create_future()
        q = Query(next(self._qids), request_id, array, now, now + limit, fut)
        q.deadline_handle = self.clock.call_later(limit, self._deadline, q)
        self.in_system += 1
        self.counters["admitted"] += 1
        self.batcher.add(q)
        return q

    def submit_tensor(self, tensor, request_id="", timeout_s=None):
        """``submit`` for a ``parm.v1.Tensor`` (parsed here, counted when invalid)."""
        try:
            array = tensors.from_proto(tensor, "input")
        except InvalidInput:
            self.counters["rejected_invalid"] += 1
            raise
        return self.submit(array, request_id, timeout_s)

    def abandon(self, query):
        """The client went away (cancelled): the query is done without an answer."""
        if self._finish_query(query, "CANCELLED"):
            query.future.cancel()
            self.counters["abandoned"] += 1
            self.observer.query_done(query, query.batch, query.batch.group_id if query.batch else 0)
            if query.batch is not None:
                self.release(query.batch)

    def _deadline(self, query):
        query.deadline_handle = None
        if query.done:
            return
        self.counters["deadline_exceeded"] += 1
        self._fail_query(query, DeadlineExceeded("deadline exceeded before an answer arrived"),
                         "DEADLINE_EXCEEDED")
        if query.batch is not None:
            self.release(query.batch)

    # ------------------------------------------------------------ queries
    def _finish_query(self, q, status):
        if q.done:
            return False
        q.done = True
        q.status = status
        q.answered_s = self.clock.now()
        self.in_system -= 1
        h = q.deadline_handle
        if h is not None:
            h.cancel()
            q.deadline_handle = None
        return True

    def _answer(self, q, output, source, batch, instance_id="", waited_s=None):
        if not self._finish_query(q, "OK"):
            return False
        q.source = source
        q.lateness_wait_s = waited_s
        q.instance_id = instance_id
        c = self.counters
        c["answered"] += 1
        if source == ORIGINAL:
            c["answered_original"] += 1
        elif source == RECONSTRUCTED:
            c["answered_reconstructed"] += 1
        elif source == BACKUP:
            c["answered_backup"] += 1
        if not q.future.done():
            q.future.set_result(Answer(output, source, batch.batch_id, batch.group_id,
                                       (q.answered_s - q.received_s) * 1e3))
        self.observer.query_done(q, batch, batch.group_id)
        return True

    def _fail_query(self, q, exc, status):
        if not self._finish_query(q, status):
            return False
        if status != "DEADLINE_EXCEEDED":
            self.counters["failed"] += 1
        if not q.future.done():
            q.future.set_exception(exc)
        self.observer.query_done(q, q.batch, q.batch.group_id if q.batch else 0)
        return True

    def answer_batch(self, batch, output, source, instance_id="", waited_s=None, copy=False):
        """Answers every not-yet-done query of ``batch`` from ``output`` rows (copies if ``copy``)."""
        n = 0
        for q in batch.queries:
            if not q.done:
                row = output[q.row]
                self._answer(q, row.copy() if copy else row, source, batch, instance_id, waited_s)
                n += 1
        return n

    def _fail_batch(self, batch, exc):
        status = "UNAVAILABLE"
        for q in batch.queries:
            self._fail_query(q, exc, status)
        self.release(batch)

    # ------------------------------------------------------------ batching
    def _on_batch_formed(self, queries):
        # A query that expired or was abandoned while its batch was forming is left out;
        # a batch with no live query is not formed at all (nothing to dispatch).
        live = [q for q in queries if not q.done]
        if len(live) < len(queries):
            self.counters["expired_forming"] += len(queries) - len(live)
            for q in queries:
                if q.done:
                    q.batch = None
            queries = live
            if not queries:
                return
        n = len(queries)
        rows = self.batch_size if self.policy.pads_batches else n
        if n == 1 and rows == 1:
            inputs = queries[0].input.reshape((1,) + self.input_shape)
        else:
            inputs = np.zeros((rows,) + self.input_shape, dtype=self.input_dtype)
            for i, q in enumerate(queries):
                inputs[i] = q.input
        for i, q in enumerate(queries):
            q.row = i
        batch = Batch(0, "data", queries, inputs, self.clock.now())
        batch.seq = next(self._seqs)
        for q in queries:
            q.batch = batch
        self.counters["batches"] += 1
        if n < self.batch_size:
            self.counters["partial_batches"] += 1
        self.policy.on_batch(batch)

    def new_batch_id(self):
        return next(self._batch_ids)

    def open_group(self, group):
        self.groups[group.group_id] = group
        self.counters["groups"] += 1

    def can_copy(self, batch):
        return any(i.instance_id not in batch.exclude for i in self.by_role[batch.role])

    def prepare(self, batch):
        if self._prepare is not None:
            self._prepare(batch)

    def fail_batch(self, batch, exc):
        self._fail_batch(batch, exc)

    def snapshot(self):
        """Plain values of the engine's state (taken on the loop; safe to read from any thread)."""
        by_role = self.by_role
        return {
            "counters": dict(self.counters),
            "in_system": self.in_system,
            "open_groups": len(self.groups),
            "queue_depths": dict(self.queue.depths()),
            "in_flight": {role: sum(i.in_flight for i in insts) for role, insts in by_role.items()},
            "instances": {role: len(insts) for role, insts in by_role.items()},
            "gauges": dict(self.policy.gauges()),
        }

    # ------------------------------------------------------------ dispatch
    def enqueue(self, batch, front=False, where=None):
        """Queues ``batch`` for its role and starts calls on free instances."""
        if batch.queue is not None:
            return
        if self._closed:
            self._drop(batch, NoInstance("the frontend is shutting down"))
            return
        role = batch.role
        if not self.by_role[role]:
            self._drop(batch, NoInstance(f"no {role} instance is available"))
            return
        if not self.policy.needed(batch):
            self._after_batch_event(batch)      # e.g. re-queued after its queries went
            return
        if self.queue.push(batch, front, self.by_role[role], where):
            self._pump(role)

    def remove_from_queue(self, batch):
        """Removes exactly ``batch`` from its queue (if queued)."""
        if self.queue.remove(batch):
            self.counters["removed_from_queue"] += 1
            return True
        return False

    def _pump(self, role):
        """Starts calls on ``role``'s instances while one may take a call and a batch waits.

        Least loaded first: every idle instance gets a call before any instance gets a
        second one (with ``max_in_flight`` > 1), so a second call is pipelined onto a busy
        instance (it waits there for the device) only when every instance of the role is
        busy. Among instances with as many calls, the rotation decides (round robin).
        """
        insts = self.by_role[role]
        n = len(insts)
        if not n:
            return
        start = self._rotation[role] % n
        order = [insts[(start + j) % n] for j in range(n)]
        now = self.clock.now()
        for level in range(self.max_in_flight):
            for j, inst in enumerate(order):
                if inst.in_flight != level or inst.removed or not self._can_start(inst, now):
                    continue
                batch = self._take(inst)
                if batch is None:
                    continue
                batches = [batch]
                while len(batches) < self.max_coalesce:
                    more = self._take(inst)
                    if more is None:
                        break
                    batches.append(more)
                self._rotation[role] = (start + j + 1) % n
                self._start_call(inst, batches)

    def _take(self, inst):
        """The next queued batch for ``inst`` that someone still needs; the others are dropped."""
        while True:
            batch = self.queue.take(inst)
            if batch is None or self.policy.needed(batch):
                return batch
            self.counters["skipped_unneeded"] += 1
            self._after_batch_event(batch)

    def _start_call(self, inst, batches):
        now = self.clock.now()
        # The call serves until the latest deadline any of its batches can still serve.
        timeout = self.instance_timeout_s
        capped = False
        deadlines = [self.policy.deadline_s(batch) for batch in batches]
        if None not in deadlines:
            latest = max(deadlines)
            if latest - now < timeout:
                timeout = max(0.001, latest - now)
                capped = True
        call = Call(batches, inst, now)
        call.capped = capped
        inst.in_flight += 1
        inst.calls.add(call)
        self.counters["calls"] += 1
        for batch in batches:
            batch.calls += 1
            batch.attempts += 1
            batch.exclude.add(inst.instance_id)
            if batch.dispatched_s is None:
                batch.dispatched_s = now
                self.observer.dispatched(batch, now - batch.created_s)
        call.timer = self.clock.call_later(timeout, self._call_timed_out, call)
        call.task = self.spawn(self._run_call(call, timeout))
        for batch in batches:
            self.policy.on_dispatched(batch, inst)

    def spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_call(self, call, timeout_s):
        inst = call.instance
        try:
            unit = call.unit
            output = await inst.client.infer(unit, timeout_s + 0.5)
            check_rows(output, unit.inputs.shape[0], self.output_shapes[unit.role],
                       f"instance {inst.instance_id}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a call is an erasure
            self._end_call_failed(call, exc, timeout=False)
            return
        self._end_call_ok(call, output)

    def _release_call(self, call):
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
        inst = call.instance
        inst.in_flight -= 1
        inst.calls.discard(call)
        for batch in call.batches:
            batch.calls -= 1

    def _call_timed_out(self, call):
        call.timer = None
        if call.finished:
            return
        if call.task is not None:
            call.task.cancel()
        if call.capped:
            # The call reached its queries' deadline, not the instance timeout: the
            # queries end (DEADLINE_EXCEEDED), the instance's health is untouched.
            now = self.clock.now()
            for batch in call.batches:
                for q in batch.queries:
                    if not q.done and q.deadline_s <= now:
                        self._deadline(q)
            self._end_call_failed(call, DeadlineExceeded("instance call reached its queries' deadline"),
                                  timeout=True, health=False)
            return
        self._end_call_failed(call, DeadlineExceeded("instance call timed out"), timeout=True)

    def _end_call_ok(self, call, output):
        if call.finished:
            return
        self._release_call(call)
        inst = call.instance
        inst.completed += 1
        inst.mark_ok()
        now = self.clock.now()
        batches = call.batches
        self.policy.on_call_done(batches[0].role, now - call.started_s)
        if len(batches) == 1:
            self.policy.on_result(batches[0], output, inst)
            self.release(batches[0])
        else:
            offset = 0
            for batch in batches:
                rows = batch.inputs.shape[0]
                self.policy.on_result(batch, output[offset:offset + rows], inst)
                offset += rows
                self.release(batch)
        if not inst.removed:
            self._pump(inst.role)

    def _end_call_failed(self, call, exc, *, timeout, health=True):
        """An erasure of every batch of ``call``. ``health``: the instance is to blame
        (an error, its own timeout): it goes into backoff and its rr queue moves to the
        live instances of its role, oldest first. A call that only reached its queries'
        deadline (``health=False``) leaves the instance as it was."""
        if call.finished:
            return
        self._release_call(call)
        inst = call.instance
        if health:
            inst.errors += 1
            self.counters["call_errors"] += 1
            if timeout:
                inst.timeouts += 1
                self.counters["call_timeouts"] += 1
        else:
            self.counters["call_deadline_expired"] += 1
        self.observer.call_failed(call, exc, timeout, health)
        log.debug("call of batch %d on %s failed: %r", call.unit.batch_id, inst.instance_id, exc)
        if health and not inst.removed:
            backoff = inst.mark_failed()
            self.clock.call_later(backoff, self._pump, inst.role)
            self._requeue(self.queue.drain_instance(inst))
        for batch in reversed(call.batches):    # re-queued at the front: keep their order
            self.policy.on_failure(batch, inst, exc)
            self._after_batch_event(batch)
        if not inst.removed:
            self._pump(inst.role)

    def retry(self, batch, exc):
        """Re-dispatches ``batch`` (front of queue) if attempts remain, else fails it.

        Caller guarantees the batch is still needed and neither queued nor in flight.
        """
        if batch.attempts >= self.max_attempts:
            if batch.role == "data" or batch.role == "backup":
                if batch.twin is not None and (batch.twin.calls or batch.twin.queue is not None):
                    return  # the twin may still answer
                self._fail_batch(batch, InstanceFailed(
                    f"batch {batch.batch_id} failed on {batch.attempts} instance calls: {exc}"))
            return
        others = [i for i in self.by_role[batch.role] if i.instance_id not in batch.exclude]
        if not others:
            batch.exclude.clear()       # every instance tried: allow them again
        self.counters["redispatches"] += 1
        self.enqueue(batch, front=True)

    def release(self, batch):
        """A queued batch related to ``batch`` (itself, its twin, its group) that can no
        longer help is removed (only it)."""
        for b in self.policy.related(batch):
            if b.queue is not None and not self.policy.needed(b):
                self.remove_from_queue(b)
        self._after_batch_event(batch)

    def _after_batch_event(self, batch):
        g = batch.group
        if g is not None and not g.finished:
            self.maybe_finish_group(g)

    def late_original(self, batch, substitute, substituted_s):
        """Records an original that arrived after its queries were answered otherwise."""
        self.counters["late_originals"] += 1
        rows = len(batch.queries)
        out = np.asarray(batch.output[:rows], dtype=np.float64).reshape(rows, -1)
        sub = np.asarray(substitute[:rows], dtype=np.float64).reshape(rows, -1)
        max_abs_error = float(np.max(np.abs(out - sub))) if out.size else 0.0
        agree = float(np.mean(out.argmax(axis=1) == sub.argmax(axis=1))) if out.size else 1.0
        delay_ms = (self.clock.now() - (substituted_s or self.clock.now())) * 1e3
        if batch.group is not None:
            batch.group.late = {"batch_id": batch.batch_id, "delay_ms": delay_ms,
                                "max_abs_error": max_abs_error, "argmax_agreement": agree}
        self.observer.late_original(batch, delay_ms, max_abs_error, agree)

    # ------------------------------------------------------------ groups
    def maybe_finish_group(self, g):
        if not g.sealed or g.encoding or g.decoding:
            return
        batches = list(g.members)
        if g.parity is not None:
            batches.append(g.parity)
        for b in batches:
            if b.calls or b.queue is not None:
                return
            for q in b.queries:
                if not q.done:
                    return
        self._finish_group(g, "complete")

    def _finish_group(self, g, reason):
        if g.finished:
            return
        g.finished = True
        if g.timer is not None:
            g.timer.cancel()
        self.groups.pop(g.group_id, None)
        if reason == "complete":
            self.counters["groups_finished"] += 1
        else:
            self.counters["groups_abandoned"] += 1
            for b in g.members + ([g.parity] if g.parity is not None else []):
                self.remove_from_queue(b)
        self.observer.group_done(g, reason)
        self.policy.on_group_done(g, reason)

    def _gc(self):
        self._gc_handle = None
        if self._closed:
            return
        now = self.clock.now()
        for g in list(self.groups.values()):
            if now - g.formed_s > self.gc_horizon_s:
                self._finish_group(g, "abandoned")
        self._gc_handle = self.clock.call_later(self._gc_interval_s, self._gc)

    # ------------------------------------------------------------ status
    def queue_depths(self):
        return self.queue.depths()

    def in_flight(self):
        return sum(i.in_flight for i in self.instances.values())
