"""Thin gRPC adapters: ``parm.v1.Frontend`` over the engine.

Parse -> call the engine -> build the reply. No try/except except the one
that turns a cancelled RPC into ``engine.abandon`` before re-raising; domain
exceptions reach ``ErrorMappingInterceptor``.
"""

import asyncio

from parm.v1 import frontend_pb2, frontend_pb2_grpc
from services.common import tensors


class FrontendServicer(frontend_pb2_grpc.FrontendServicer):
    """``Predict`` and ``GetStatus``; ``status_fn()`` builds the status reply."""

    def __init__(self, engine, status_fn):
        self.engine = engine
        self.status_fn = status_fn

    async def Predict(self, request, context):
        q = self.engine.submit_tensor(request.input, request.request_id, context.time_remaining())
        try:
            a = await q.future
        except asyncio.CancelledError:
            self.engine.abandon(q)
            raise
        reply = frontend_pb2.PredictResponse(
            source=a.source, request_id=request.request_id, batch_id=a.batch_id,
            group_id=a.group_id, frontend_latency_ms=a.latency_ms)
        tensors.to_proto(a.output, reply.output)
        return reply

    async def GetStatus(self, request, context):
        return self.status_fn()
