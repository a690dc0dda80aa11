"""An in-process ``parm.v1.ModelServer`` over real gRPC, for service tests.

Computes ``x @ (W * scale)``; ``delay_s`` delays every reply; ``hang`` never
answers; ``fail`` answers UNAVAILABLE.
"""

import asyncio

import grpc
import numpy as np

from parm.v1 import model_server_pb2, model_server_pb2_grpc
from services.common import tensors
from services.common.server import create_server
from tests.frontend.models import W


class FakeModelServer(model_server_pb2_grpc.ModelServerServicer):
    def __init__(self, scale=1.0, delay_s=0.0):
        self.scale = scale
        self.delay_s = delay_s
        self.hang = False
        self.fail = False
        self.batches = []

    async def Infer(self, request, context):
        x = tensors.from_proto(request.input)
        self.batches.append(request.batch_id)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake failure")
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = (x.reshape(len(x), -1) @ (W * self.scale)).astype(np.float32)
        return model_server_pb2.InferResponse(output=tensors.to_proto(out), batch_id=request.batch_id)


async def start_fake(**kw):
    """Starts one fake on port 0; returns (servicer, built server, address)."""
    servicer = FakeModelServer(**kw)
    built = create_server("127.0.0.1:0", [(model_server_pb2_grpc.add_ModelServerServicer_to_server,
                                           servicer, "parm.v1.ModelServer")])
    await built.server.start()
    return servicer, built, f"127.0.0.1:{built.port}"
