"""The gRPC adapter of the coder: parse -> core -> reply.

The core runs each kernel into a pooled buffer and calls ``into`` while it
owns that buffer; ``into`` here serialises straight into the reply
(``tensors.to_proto`` copies the bytes), so the reply never references a
pooled buffer (see ``services.coder.core``).
"""

from parm.v1 import coder_pb2 as pb
from parm.v1 import coder_pb2_grpc as pb_grpc
from services.common import tensors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coder"].full_name


class CoderServicer(pb_grpc.CoderServicer):
    """Thin servicer over a ``CoderCore``; errors map in the interceptor."""

    def __init__(self, core):
        self.core = core

    async def Encode(self, request, context):
        inputs = [tensors.from_proto(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)]
        reply = pb.EncodeResponse()
        _, reply.encode_us = await self.core.encode(
            request.encoder, inputs, list(request.scale), list(request.shift),
            into=lambda parity: tensors.to_proto(parity, reply.parity))
        return reply

    async def Decode(self, request, context):
        parity_output = tensors.from_proto(request.parity_output, "parity_output")
        available = [tensors.from_proto(t, f"available_outputs[{i}]")
                     for i, t in enumerate(request.available_outputs)]
        reply = pb.DecodeResponse()
        _, reply.decode_us = await self.core.decode(
            parity_output, available,
            into=lambda reconstruction: tensors.to_proto(reconstruction, reply.reconstruction))
        return reply
