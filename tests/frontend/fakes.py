"""Hand-written fakes of the frontend's transport, plus a tiny linear model."""

import asyncio

import numpy as np

from services.common.manifest import Manifest
from services.frontend.instances import InstanceClient

IN_SHAPE = (4,)
OUT_SHAPE = (3,)
W = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 1.0], [-1.5, 1.0, 0.0]], dtype=np.float32)


def linear(x):
    """F(x) = x @ W for (B, 4) -> (B, 3): linear, so Fp = F decodes exactly."""
    return (np.asarray(x, dtype=np.float32).reshape(len(x), -1) @ W).astype(np.float32)


def base_manifest(**kw):
    values = dict(name="lin", role="base", arch="linear", dataset="synthetic", split_seed=0, split={},
                  input_shape=IN_SHAPE, input_dtype="float32", output_shape=OUT_SHAPE,
                  onnx_file="lin.onnx")
    values.update(kw)
    return Manifest(**values)


class FakeClient(InstanceClient):
    """Records every call; answers at once (auto) or when the test says so.

    ``mode``: "auto" (answer with ``fn(inputs)`` after one loop turn),
    "manual" (park the call in ``pending`` until ``release``/``fail``),
    "error" (raise at once), "hang" (never answer).
    """

    def __init__(self, address, fn=linear, mode="auto"):
        self.address = address
        self.fn = fn
        self.mode = mode
        self.calls = []
        self.pending = []
        self.closed = False

    async def infer(self, batch, timeout_s):
        self.calls.append(batch.batch_id)
        if self.mode == "error":
            raise ConnectionError(f"{self.address} is down")
        if self.mode == "auto":
            await asyncio.sleep(0)
            return self.fn(batch.inputs)
        fut = asyncio.get_running_loop().create_future()
        if self.mode == "manual":
            self.pending.append((batch, fut))
        return await fut

    def release(self, batch_id=None):
        """Answers the pending call of ``batch_id`` (default: the oldest)."""
        for i, (batch, fut) in enumerate(self.pending):
            if batch_id is None or batch.batch_id == batch_id:
                del self.pending[i]
                if not fut.done():
                    fut.set_result(self.fn(batch.inputs))
                return batch
        raise AssertionError(f"{self.address}: no pending call for batch {batch_id}")

    def fail(self, batch_id=None):
        for i, (batch, fut) in enumerate(self.pending):
            if batch_id is None or batch.batch_id == batch_id:
                del self.pending[i]
                if not fut.done():
                    fut.set_exception(ConnectionError("boom"))
                return batch
        raise AssertionError(f"{self.address}: no pending call for batch {batch_id}")

    def pending_ids(self):
        return [b.batch_id for b, _ in self.pending]

    async def close(self):
        self.closed = True


class FakeFleet:
    """client_factory for the engine: one FakeClient per address, kept for inspection."""

    def __init__(self, modes=None, fns=None):
        self.modes = modes or {}
        self.fns = fns or {}
        self.clients = {}

    def __call__(self, address):
        c = FakeClient(address, fn=self.fns.get(address, linear), mode=self.modes.get(address, "manual"))
        self.clients[address] = c
        return c

    def __getitem__(self, address):
        return self.clients[address]


ENGINES = []
"""Engines built by the running test (``track``); the conftest harness checks they were closed."""


def track(engine):
    """Registers ``engine`` with the harness (every engine a test builds must be closed by it)."""
    ENGINES.append(engine)
    return engine


async def settle(turns=20):
    """Lets the event loop run every ready callback (no time passes)."""
    for _ in range(turns):
        await asyncio.sleep(0)
