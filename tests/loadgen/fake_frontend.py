"""An in-process fake ``parm.v1.Frontend`` with known, per-label behaviour.

Examples are vectors of shape (4,) float32 whose first element is
``label / 10``; the fake reads the label back from the input and answers as
``BEHAVIOUR[label]`` says: the source, whether the prediction is right
(a one-hot output of the label, or of ``label + 1`` when wrong), a delay,
or an error code. It logs every request it saw (request id -> label), so
tests check the load generator's records against what the server received.
It runs its own event loop in a thread, so tests may start it and then run
``python -m loadgen`` as a real process against it.
"""

import asyncio
import threading
from dataclasses import dataclass

import grpc
import numpy as np

from parm.v1 import frontend_pb2, frontend_pb2_grpc
from services.common.server import create_server
from services.common.tensors import from_proto, to_proto

NUM_CLASSES = 10


@dataclass(frozen=True)
class Behaviour:
    source: int = frontend_pb2.ORIGINAL
    correct: bool = True
    delay_ms: float = 0.0
    error: grpc.StatusCode | None = None


def default_behaviour():
    """Labels 0-5 original, 6 reconstructed, 7 reconstructed and wrong,
    8 backup, 9 RESOURCE_EXHAUSTED; delay 2 ms per label."""
    table = {}
    for label in range(NUM_CLASSES):
        if label <= 5:
            b = Behaviour(frontend_pb2.ORIGINAL)
        elif label == 6:
            b = Behaviour(frontend_pb2.RECONSTRUCTED)
        elif label == 7:
            b = Behaviour(frontend_pb2.RECONSTRUCTED, correct=False)
        elif label == 8:
            b = Behaviour(frontend_pb2.BACKUP)
        else:
            b = Behaviour(error=grpc.StatusCode.RESOURCE_EXHAUSTED)
        table[label] = Behaviour(b.source, b.correct, 2.0 * label, b.error)
    return table


def make_inputs(n, seed=0):
    """(X of shape (n, 4) float32, y of shape (n,) int64), labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % NUM_CLASSES
    x = rng.random((n, 4), dtype=np.float32)
    x[:, 0] = y / 10.0
    return x, y


def expected_predicted(label, behaviour):
    return label if behaviour.correct else (label + 1) % NUM_CLASSES


class _Servicer(frontend_pb2_grpc.FrontendServicer):
    def __init__(self, fake):
        self._fake = fake

    async def Predict(self, request, context):
        x = from_proto(request.input)
        label = int(round(float(x.flat[0]) * 10))
        behaviour = self._fake.behaviour[label]
        self._fake.seen[request.request_id] = label
        self._fake.in_flight += 1
        self._fake.max_in_flight = max(self._fake.max_in_flight, self._fake.in_flight)
        try:
            if behaviour.delay_ms:
                await asyncio.sleep(behaviour.delay_ms / 1e3)
        finally:
            self._fake.in_flight -= 1
        if behaviour.error is not None:
            await context.abort(behaviour.error, "fake error")
        out = np.zeros(NUM_CLASSES, dtype=np.float32)
        out[expected_predicted(label, behaviour)] = 1.0
        return frontend_pb2.PredictResponse(
            output=to_proto(out), source=behaviour.source, request_id=request.request_id,
            batch_id=7, group_id=3, frontend_latency_ms=behaviour.delay_ms)

    async def GetStatus(self, request, context):
        return frontend_pb2.GetStatusResponse(
            redundancy_mode=self._fake.mode, queue_mode="single_queue", k=2, batch_size=1,
            model="fake", manifest_json=self._fake.manifest_json)


class FakeFrontend:
    """Context manager: ``with FakeFrontend() as fe: fe.address``."""

    def __init__(self, behaviour=None, mode="coded", manifest_json=""):
        self.behaviour = behaviour or default_behaviour()
        self.mode = mode
        self.manifest_json = manifest_json
        self.seen = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._built = None

    @property
    def address(self):
        return f"127.0.0.1:{self._built.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self):
        self._built = create_server("127.0.0.1:0", [(frontend_pb2_grpc.add_FrontendServicer_to_server,
                                                     _Servicer(self), "parm.v1.Frontend")])
        await self._built.server.start()

    def __enter__(self):
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc):
        self._call(self._built.server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
