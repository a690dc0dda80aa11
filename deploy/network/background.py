"""Emulated background network load for one machine.

On one machine the instances share loopback, so a real 128-256 MB shuffle
between two of them does not congest anything the queries cross. This module
stands in for it, explicitly and reproducibly (seeded):

**What is drawn** (the same as the real shuffles of ``deploy.network.shuffle``):
``n`` concurrent shuffles in a loop; each picks a random ordered pair of
distinct instances and a size uniform in ``size_mb``; it lasts
``2 * size * 8 / bandwidth_mbps`` seconds (there and back at the link rate).

**What a transfer does to the two instances it touches** (the model): while
at least one transfer touches an instance, every request to it gets

- an extra queueing delay drawn from ``delay`` (default exponential, mean
  6 ms): a bulk TCP flow keeps the bottleneck queue of the shared link full,
  so a small request waits behind it; the wait varies with the queue's fill;
- with probability ``stall_probability`` (default 1 %) an extra ``stall_ms``
  (default 200 ms): a request packet dropped at the full queue is recovered
  only by a retransmission timeout, and Linux's minimum RTO is 200 ms. These
  stalls are what make the tail: the paper's Figure 9 tails sit hundreds of
  ms above medians of tens of ms.

The perturbation is applied through each model server's ``SetPerturbation``
admin RPC when an instance's count of touching transfers goes 0 -> 1 and
cleared at 1 -> 0 (reference counted, so overlapping transfers do not clear
each other's effect). Each application gets its own seed derived from the
run seed and a counter, so a run is repeatable.

Invariants: ``stop()`` cancels the shuffle loops and clears every
perturbation it set before returning; the timeline of transfers is kept for
the report.
"""

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Transfer:
    start_s: float
    duration_s: float
    src: int
    dst: int
    size_mb: float


@dataclass
class BackgroundModel:
    bandwidth_mbps: float = 2000.0
    size_mb: tuple = (128.0, 256.0)
    delay: dict = field(default_factory=lambda: {"kind": "exponential", "params": {"mean_ms": 6.0}})
    stall_probability: float = 0.01
    stall_ms: float = 200.0

    @classmethod
    def from_config(cls, data):
        return cls(
            bandwidth_mbps=float(data["bandwidth_mbps"]),
            size_mb=tuple(float(s) for s in data["size_mb"]),
            delay=data["delay"],
            stall_probability=float(data["stall_probability"]),
            stall_ms=float(data["stall_ms"]),
        )

    def duration_s(self, size_mb):
        return 2.0 * size_mb * 8.0 / self.bandwidth_mbps


def perturbation_message(model, seed):
    """The ``parm.v1.Perturbation`` a touched instance gets."""
    from parm.v1 import model_server_pb2 as pb

    return pb.Perturbation(
        delay=pb.Distribution(kind=model.delay["kind"], params=model.delay.get("params", {}), seed=seed),
        stall_probability=model.stall_probability,
        stall_ms=model.stall_ms,
    )


class GrpcPerturbationSetter:
    """Sets/clears perturbations on model servers over their admin RPC."""

    def __init__(self, timeout_s=5.0):
        self._channels = {}
        self.timeout_s = timeout_s

    def _stub(self, address):
        from parm.v1 import model_server_pb2_grpc
        from services.common.server import open_channel

        if address not in self._channels:
            self._channels[address] = open_channel(address)
        return model_server_pb2_grpc.ModelServerStub(self._channels[address])

    async def __call__(self, address, perturbation):
        from parm.v1 import model_server_pb2 as pb

        request = (
            pb.SetPerturbationRequest(clear=True)
            if perturbation is None
            else pb.SetPerturbationRequest(perturbation=perturbation)
        )
        await self._stub(address).SetPerturbation(request, timeout=self.timeout_s)

    async def close(self):
        for channel in self._channels.values():
            await channel.close()
        self._channels = {}


class EmulatedBackground:
    """Runs ``n`` emulated shuffles over ``instances`` (model-server addresses)."""

    def __init__(self, instances, n, model, seed=0, *, setter=None, sleep=asyncio.sleep,
                 clock=time.monotonic):
        if n > 0 and len(instances) < 2:
            raise ValueError("background shuffles need at least two instances")
        self.instances = list(instances)
        self.n = n
        self.model = model
        self._rng = random.Random(seed)
        self._seed = seed
        self._setter = setter or GrpcPerturbationSetter()
        self._sleep = sleep
        self._clock = clock
        self._touching = [0] * len(self.instances)
        self._applied = 0
        self._tasks = []
        self._stopping = False
        self._t0 = None
        self.timeline = []
        self.errors = 0

    def start(self):
        self._t0 = self._clock()
        self._tasks = [asyncio.ensure_future(self._loop()) for _ in range(self.n)]

    async def stop(self):
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for i, count in enumerate(self._touching):
            if count:
                self._touching[i] = 0
                await self._set(i, None)
        close = getattr(self._setter, "close", None)
        if close is not None:
            await close()

    @property
    def t0(self):
        """The clock's reading at ``start()``: the timeline's times are seconds after it."""
        return self._t0

    def busy_fraction(self):
        """Fraction of instance-time touched by at least one transfer so far."""
        if not self.timeline or self._t0 is None:
            return 0.0
        elapsed = max(self._clock() - self._t0, 1e-9)
        per_instance = [[] for _ in self.instances]
        for t in self.timeline:
            for i in (t.src, t.dst):
                per_instance[i].append((t.start_s, min(t.start_s + t.duration_s, elapsed)))
        covered = 0.0
        for spans in per_instance:
            end = -1.0
            for s, e in sorted(spans):
                s = max(s, end)
                if e > s:
                    covered += e - s
                    end = e
        return covered / (elapsed * len(self.instances))

    async def _set(self, index, perturbation):
        try:
            await self._setter(self.instances[index], perturbation)
        except Exception as exc:  # noqa: BLE001 - an instance may be gone; keep going
            self.errors += 1
            log.warning("background: cannot perturb %s: %s", self.instances[index], exc)

    async def _acquire(self, index):
        self._touching[index] += 1
        if self._touching[index] == 1:
            self._applied += 1
            seed = (self._seed * 1_000_003 + self._applied) & 0xFFFFFFFF
            await self._set(index, perturbation_message(self.model, seed))

    async def _release(self, index):
        self._touching[index] -= 1
        if self._touching[index] == 0:
            await self._set(index, None)

    async def _loop(self):
        while not self._stopping:
            src, dst = self._rng.sample(range(len(self.instances)), 2)
            size_mb = self._rng.uniform(*self.model.size_mb)
            duration = self.model.duration_s(size_mb)
            self.timeline.append(Transfer(self._clock() - self._t0, duration, src, dst, size_mb))
            await self._acquire(src)
            await self._acquire(dst)
            try:
                await self._sleep(duration)
            finally:
                # On cancellation stop() clears whatever is still touched.
                if not asyncio.current_task().cancelling():
                    await self._release(src)
                    await self._release(dst)
