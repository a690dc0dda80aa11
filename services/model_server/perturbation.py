"""Injected faults for experiments: delay, stall, fail, hang, stop.

Semantics (per request, in this order, after the input is validated):

1. ``hang``: the request is accepted and held without an answer until the
   hang is cleared (``SetPerturbation`` clear, a new perturbation without
   hang, or ``duration_s`` elapsing); then it proceeds normally. A client
   deadline ends it earlier (DEADLINE_EXCEEDED at the client).
2. ``fail_probability``: with this probability the request fails with
   UNAVAILABLE (``InstanceFailed``) without running inference.
3. Inference and the emulated compute time run.
4. ``delay``: an extra delay drawn from the delay distribution, plus, with
   probability ``stall_probability``, a stall of ``stall_ms`` (an emulated
   retransmission timeout). Awaited with asyncio, reported as
   ``perturbation_ms``.

``stop`` is not per request: setting it makes the process kill itself with
SIGKILL (as if killed: no deregistration, no graceful shutdown) right after
acknowledging the RPC. ``duration_s > 0`` clears the perturbation
automatically that many seconds after it was set.

Random draws are seeded: the delay distribution uses its own ``seed`` (or,
when 0, the instance seed + a per-set counter), and the fail/stall rolls use
a generator seeded from the same value, so a run is reproducible.
"""

import asyncio
from dataclasses import dataclass, field

import numpy as np

from services.common.clock import REAL as REAL_CLOCK
from services.common.errors import InstanceFailed, InvalidInput
from services.model_server.distributions import DistSpec, Sampler


@dataclass(frozen=True)
class PerturbationSpec:
    delay: DistSpec = field(default_factory=DistSpec)
    stall_probability: float = 0.0
    stall_ms: float = 0.0
    fail_probability: float = 0.0
    hang: bool = False
    stop: bool = False
    duration_s: float = 0.0

    def __post_init__(self):
        for name in ("stall_probability", "fail_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"perturbation {name} = {value} not in [0, 1]")
        for name in ("stall_ms", "duration_s"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise InvalidInput(f"perturbation {name} = {value} must be finite and >= 0")

    @property
    def is_clear(self):
        return self == PerturbationSpec(duration_s=self.duration_s)

    @classmethod
    def from_proto(cls, msg):
        return cls(
            delay=DistSpec.from_proto(msg.delay),
            stall_probability=msg.stall_probability,
            stall_ms=msg.stall_ms,
            fail_probability=msg.fail_probability,
            hang=msg.hang,
            stop=msg.stop,
            duration_s=msg.duration_s,
        )

    def to_proto(self, msg):
        self.delay.to_proto(msg.delay)
        msg.stall_probability = self.stall_probability
        msg.stall_ms = self.stall_ms
        msg.fail_probability = self.fail_probability
        msg.hang = self.hang
        msg.stop = self.stop
        msg.duration_s = self.duration_s
        return msg

    def describe(self):
        if self.is_clear:
            return "none"
        parts = []
        if not self.delay.is_none:
            parts.append(f"delay={self.delay.describe()}")
        if self.stall_probability:
            parts.append(f"stall={self.stall_probability:g}x{self.stall_ms:g}ms")
        if self.fail_probability:
            parts.append(f"fail={self.fail_probability:g}")
        if self.hang:
            parts.append("hang")
        if self.stop:
            parts.append("stop")
        if self.duration_s:
            parts.append(f"for {self.duration_s:g}s")
        return " ".join(parts)


class PerturbationController:
    """Holds the current perturbation and applies it to requests.

    Must be used from one event loop. ``clock`` (a ``services.common.clock.Clock``,
    default the real one) reads time, times ``duration_s`` and awaits the
    delays; ``on_stop`` is called when a perturbation with ``stop`` is set.
    """

    def __init__(self, *, seed=0, clock=None, on_stop=None):
        self._seed = int(seed)
        self._clock = clock or REAL_CLOCK
        self._on_stop = on_stop
        self._sets = 0
        self._clear_handle = None
        self._hang_released = asyncio.Event()
        self._hang_released.set()
        self._apply(PerturbationSpec())

    @property
    def current(self):
        self._expire()
        return self.spec

    def _apply(self, spec):
        self.spec = spec
        self._sets += 1
        seed = spec.delay.seed or (self._seed * 1_000_003 + self._sets)
        self._delay = Sampler(DistSpec(spec.delay.kind, spec.delay.params, seed))
        self._rng = np.random.default_rng(seed + 1)
        self._expires_at = self._clock.now() + spec.duration_s if spec.duration_s > 0 else None
        if spec.hang:
            if self._hang_released.is_set():
                self._hang_released = asyncio.Event()
        else:
            self._hang_released.set()

    def set(self, spec):
        """Replaces the current perturbation (``PerturbationSpec()`` clears)."""
        if self._clear_handle is not None:
            self._clear_handle.cancel()
            self._clear_handle = None
        self._apply(spec)
        if spec.duration_s > 0:
            try:
                self._clear_handle = self._clock.call_later(spec.duration_s, self._auto_clear)
            except RuntimeError:  # no running loop: the clock's expiry check clears it
                self._clear_handle = None
        if spec.stop and self._on_stop is not None:
            self._on_stop()
        return self.spec

    def clear(self):
        return self.set(PerturbationSpec())

    def _auto_clear(self):
        self._clear_handle = None
        self._apply(PerturbationSpec())

    def _expire(self):
        if self._expires_at is not None and self._clock.now() >= self._expires_at:
            self._auto_clear()

    async def before_inference(self):
        """Holds the request while hanging; raises InstanceFailed on an injected failure."""
        self._expire()
        while self.spec.hang:
            await self._hang_released.wait()
            self._expire()
        if self.spec.fail_probability and self._rng.random() < self.spec.fail_probability:
            raise InstanceFailed("injected failure (perturbation fail_probability)")

    async def after_inference(self):
        """Awaits the delay (and maybe a stall); returns the milliseconds added."""
        self._expire()
        spec = self.spec
        delay_ms = self._delay.sample_ms()
        if spec.stall_probability and self._rng.random() < spec.stall_probability:
            delay_ms += spec.stall_ms
        if delay_ms > 0:
            await self._clock.sleep(delay_ms / 1000.0)
        return delay_ms
