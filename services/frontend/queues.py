"""Queue policies: where a batch waits and which instance takes it.

Both policies are called only from the event loop thread (no locks). A batch
is in at most one queue at a time (``batch.queue`` names it, ``None`` when not
queued); ``remove`` takes out exactly that batch and nothing else (the
original removed every batch up to an id, losing other groups' queries).

A policy never starts calls itself: the engine asks ``take(instance)`` for an
instance that has a free slot.
"""

from collections import deque


class _BatchQueues:
    """What both policies share: a queued batch records its deque in
    ``batch.queue`` (None when not queued), so removal is per batch."""

    @staticmethod
    def _put(q, batch, where):
        """``where``: "back", "front", or "age" (before the first batch formed after it,
        so a queue that was oldest first stays so: moved batches keep their place in age)."""
        if where == "front":
            q.appendleft(batch)
        elif where == "age":
            for i, other in enumerate(q):
                if other.seq > batch.seq:
                    q.insert(i, batch)
                    break
            else:
                q.append(batch)
        else:
            q.append(batch)
        batch.queue = q

    def remove(self, batch):
        """Removes exactly ``batch`` if it is queued; True if it was."""
        q = batch.queue
        if q is None:
            return False
        q.remove(batch)
        batch.queue = None
        return True


class SingleQueue(_BatchQueues):
    """``single_queue``: one FIFO per role; idle instances pull.

    Algorithm: ``push`` appends to the role's FIFO (``front=True`` puts a
    retried or hedged batch first). ``take(instance)`` returns the first batch
    of the instance's role whose ``exclude`` set does not name the instance
    (an instance never gets a second copy of a batch it already failed or is
    already running). The caller guarantees ``instance`` has a free slot.
    """

    name = "single_queue"

    def __init__(self):
        self._queues = {}

    def _q(self, role):
        q = self._queues.get(role)
        if q is None:
            q = self._queues[role] = deque()
        return q

    def push(self, batch, front=False, instances=(), where=None):
        self._put(self._q(batch.role), batch, where or ("front" if front else "back"))
        return True

    def take(self, instance):
        q = self._queues.get(instance.role)
        if not q:
            return None
        iid = instance.instance_id
        for i, batch in enumerate(q):
            if iid not in batch.exclude:
                if i == 0:
                    q.popleft()
                else:
                    del q[i]
                batch.queue = None
                return batch
            if i >= 64:
                break
        return None

    def drain_instance(self, instance):
        """Batches held for ``instance`` alone (none in this policy)."""
        return []

    def drain_role(self, role):
        q = self._queues.get(role)
        if not q:
            return []
        out = list(q)
        q.clear()
        for b in out:
            b.queue = None
        return out

    def depths(self):
        return {role: len(q) for role, q in self._queues.items()}

    def queued(self, role):
        """The batches of ``role`` now queued (a snapshot list)."""
        return list(self._queues.get(role, ()))


class RoundRobinQueues(_BatchQueues):
    """``rr``: one FIFO per instance, filled round robin.

    Algorithm: ``push`` walks the role's instances in a fixed rotation,
    starting after the last one used, and appends the batch to the first
    instance that is healthy and not in ``batch.exclude`` (falling back to any
    instance not excluded, then to any instance). ``take(instance)`` pops the
    head of the instance's own FIFO. When an instance leaves, fails or times
    out, the engine drains its FIFO (``drain_instance``) and pushes those
    batches again, oldest first, each into its new queue by age (``where="age"``).
    """

    name = "rr"

    def __init__(self):
        self._queues = {}       # instance_id -> deque
        self._next = {}         # role -> rotation index

    def push(self, batch, front=False, instances=(), where=None):
        """``instances``: the role's instances in rotation order (engine-supplied);
        ``where``: see ``_put`` (default "front" if ``front`` else "back")."""
        if not instances:
            return False
        start = self._next.get(batch.role, 0)
        n = len(instances)
        choice = None
        for pass_ in range(3):
            for j in range(n):
                inst = instances[(start + j) % n]
                if pass_ < 2 and inst.instance_id in batch.exclude:
                    continue
                if pass_ == 0 and not inst.usable:
                    continue
                choice = (start + j) % n
                break
            if choice is not None:
                break
        inst = instances[choice]
        self._next[batch.role] = choice + 1
        q = self._queues.get(inst.instance_id)
        if q is None:
            q = self._queues[inst.instance_id] = deque()
        self._put(q, batch, where or ("front" if front else "back"))
        return True

    def take(self, instance):
        q = self._queues.get(instance.instance_id)
        if not q:
            return None
        batch = q.popleft()
        batch.queue = None
        return batch

    def drain_instance(self, instance):
        q = self._queues.pop(instance.instance_id, None)
        if not q:
            return []
        out = list(q)
        for b in out:
            b.queue = None
        return out

    def drain_role(self, role):
        out = []
        for q in self._queues.values():
            keep = [b for b in q if b.role != role]
            out.extend(b for b in q if b.role == role)
            q.clear()
            q.extend(keep)
        for b in out:
            b.queue = None
        return out

    def queued(self, role):
        return [b for q in self._queues.values() for b in q if b.role == role]

    def depths(self):
        out = {}
        for q in self._queues.values():
            for b in q:
                out[b.role] = out.get(b.role, 0) + 1
        return out


def make_queue_policy(name):
    if name == "single_queue":
        return SingleQueue()
    if name == "rr":
        return RoundRobinQueues()
    raise ValueError(f"unknown queue mode {name!r} (single_queue|rr)")
