"""The boundary between the engine and a redundancy policy.

``PolicyHost`` is everything a policy may ask of the engine; the engine
implements it, and a policy sees nothing else (no attribute whose name starts
with ``_``). ``RedundancyPolicy`` is what the engine asks of a policy.

Both sides run on the event loop thread only; no call blocks.
"""

from typing import Any, Awaitable, Protocol


class PolicyHost(Protocol):
    """What a policy may use: the clock, counters, queues, answers, retries, groups.

    Attributes:
        clock: the injected ``clock.Clock`` (``now()``, ``call_later``).
        counters: the engine's event counters (name -> int); a policy only
            increments the names in ``engine.COUNTERS``.
        observer: receives records and metric events (``engine.NullObserver``).
        max_attempts: instance calls per batch before it fails.
        group_timeout_s: how long a forming coding group waits for members.
    """

    clock: Any
    counters: dict
    observer: Any
    max_attempts: int
    group_timeout_s: float

    def new_batch_id(self) -> int:
        """The next id of a batch that is its own group (none/equal/cheap/hedged)."""

    def enqueue(self, batch, front: bool = False) -> None:
        """Queues ``batch`` for its role (front: before the others) and starts calls.

        A data batch with no instance of its role fails UNAVAILABLE; a parity or
        backup batch is dropped (its group goes on without it).
        """

    def retry(self, batch, exc: BaseException) -> None:
        """Re-dispatches a needed batch that is neither queued nor in flight, or
        fails it once its attempts are spent (``exc`` is named in the error)."""

    def fail_batch(self, batch, exc: BaseException) -> None:
        """Fails every not-yet-done query of ``batch`` UNAVAILABLE with ``exc``."""

    def answer_batch(self, batch, output, source, instance_id: str = "", waited_s: float | None = None,
                     copy: bool = False) -> int:
        """Answers every not-yet-done query of ``batch`` from ``output`` rows; returns how many.
        ``waited_s``: how long a substitute waited for the original to be late (records).
        ``copy``: each answer gets a copy of its row, not a view (``output`` is a pooled
        buffer that will be reused while the answers are still being serialised)."""

    def remove_from_queue(self, batch) -> bool:
        """Removes exactly ``batch`` from its queue; True if it was queued."""

    def release(self, batch) -> None:
        """``batch`` (or its twin) may no longer be needed: unqueue it if so, and
        let its group finish if that was the last thing it waited for."""

    def has_role(self, role: str) -> bool:
        """True if at least one instance of ``role`` is known."""

    def has_idle_instance(self, role: str) -> bool:
        """True if a batch of ``role`` queued now would start at once on an idle instance
        (nothing of the role queued, an instance of it with no call in flight)."""

    def can_copy(self, batch) -> bool:
        """True if an instance of ``batch``'s role has not been given ``batch`` yet."""

    def open_group(self, group) -> None:
        """Adds a new coding group to the table (counted; swept by the GC)."""

    def maybe_finish_group(self, group) -> None:
        """Finishes ``group`` if it is sealed and nothing of it is queued, in flight or waiting."""

    def late_original(self, batch, substitute, substituted_s: float) -> None:
        """Records an original that arrived after its queries were answered by ``substitute``."""

    def prepare(self, batch) -> None:
        """Serialises ``batch`` for the transport now (so encode time includes it)."""

    def spawn(self, coro: Awaitable) -> Any:
        """Runs ``coro`` as a task the engine owns (cancelled at close)."""


class RedundancyPolicy(Protocol):
    """What the engine asks of a policy (all on the event loop thread).

    Class attributes:
        mode: the ``--mode`` name(s) it serves.
        roles: the instance roles the mode uses (what a source should take).
        pads_batches: True if a batch that flushes short is padded with zero
            rows to the batch size (coded: every member and the parity have
            the same rows).
        coalescing: False if batches must never share an instance call.
    """

    roles: tuple
    pads_batches: bool
    coalescing: bool

    def attach(self, host: PolicyHost) -> None:
        """Called once by the engine's constructor."""

    def on_batch(self, batch) -> None:
        """A data batch has formed: give it ids and queue it (plus its redundancy)."""

    def on_dispatched(self, batch, instance) -> None:
        """A call for ``batch`` started on ``instance``."""

    def on_result(self, batch, output, instance) -> None:
        """A call of ``batch`` answered ``output`` (ndarray (rows, *output_shape))."""

    def on_failure(self, batch, instance, exc: BaseException) -> None:
        """A call of ``batch`` failed or timed out (an erasure)."""

    def on_call_done(self, role: str, seconds: float) -> None:
        """A call of ``role`` answered after ``seconds`` (once per call)."""

    def on_dropped(self, batch, exc: BaseException) -> None:
        """``batch`` cannot be queued: no instance of its role is left, or the
        frontend is shutting down (``exc`` says which)."""

    def needed(self, batch) -> bool:
        """May ``batch`` still help? A queued batch that is not is unqueued, and one
        taken from a queue is dropped instead of dispatched."""

    def deadline_s(self, batch) -> float | None:
        """The latest deadline a call of ``batch`` can still serve (None: no cap); a
        call is capped by it, and reaching it ends the call without blaming the instance."""

    def related(self, batch) -> tuple:
        """``batch`` and the batches whose usefulness changes with it (twin, group)."""

    def gauges(self) -> dict:
        """Policy state worth exporting (name -> float), e.g. the hedge delay."""

    def on_group_done(self, group, reason: str) -> None:
        """``group`` finished ("complete") or was dropped ("abandoned": GC sweep or
        shutdown); called once, after its record. The policy returns what the group
        held (coded: its pooled buffers)."""
