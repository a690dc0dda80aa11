"""The gRPC adapter of the sender: a ``parm.v1.Frontend`` client.

``FrontendClient.predict`` is the sender's transport: it converts the example
with ``services.common.tensors``, calls ``Predict`` with the per-query
deadline, and turns any ``grpc.aio.AioRpcError`` into
``QueryFailed(code name)``. One client holds ``channels`` channels to the
target and spreads queries over them round-robin.
"""

import grpc

from loadgen.records import SOURCE_NAMES
from loadgen.sender import QueryFailed, Reply
from parm.v1 import frontend_pb2, frontend_pb2_grpc
from services.common.server import open_channel
from services.common.tensors import from_proto, to_proto

DEFAULT_TARGET = "127.0.0.1:50051"


class TargetUnavailable(RuntimeError):
    """Nothing answers at the target address."""


def unavailable_message(target, detail=""):
    detail = f" ({detail})" if detail else ""
    return (f"no frontend at {target}{detail}; start one with `make serve` "
            f"(it listens on {DEFAULT_TARGET}) or pass --target host:port")


class FrontendClient:
    def __init__(self, target, *, channels=1):
        self.target = target
        self._channels = [open_channel(target) for _ in range(max(1, int(channels)))]
        self._stubs = [frontend_pb2_grpc.FrontendStub(c) for c in self._channels]
        self._next = 0

    async def status(self, timeout_s=5.0):
        """``GetStatus``; None when the frontend does not implement it.

        Raises:
            TargetUnavailable: nothing answers at the target.
        """
        try:
            return await self._stubs[0].GetStatus(frontend_pb2.GetStatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TargetUnavailable(unavailable_message(self.target, exc.code().name)) from None
            raise TargetUnavailable(
                unavailable_message(self.target, f"GetStatus: {exc.code().name} {exc.details()}")
            ) from None

    async def predict(self, request_id, x, timeout_s):
        stub = self._stubs[self._next]
        self._next = (self._next + 1) % len(self._stubs)
        request = frontend_pb2.PredictRequest(input=to_proto(x), request_id=request_id)
        try:
            reply = await stub.Predict(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise QueryFailed(exc.code().name, exc.details() or "") from None
        try:
            output = from_proto(reply.output, "output")
        except ValueError as exc:
            raise QueryFailed("BAD_OUTPUT", str(exc)) from None
        return Reply(
            output=output,
            source=SOURCE_NAMES.get(reply.source, str(reply.source)),
            batch_id=reply.batch_id,
            group_id=reply.group_id,
            frontend_latency_ms=reply.frontend_latency_ms,
        )

    async def close(self):
        for channel in self._channels:
            await channel.close()
