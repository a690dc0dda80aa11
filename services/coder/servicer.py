"""The gRPC adapter of the coder: parse -> core -> reply."""

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
        parity, encode_us = await self.core.encode(
            request.encoder, inputs, list(request.scale), list(request.shift))
        reply = pb.EncodeResponse(encode_us=encode_us)
        tensors.to_proto(parity, reply.parity)
        return reply

    async def Decode(self, request, context):
        parity_output = tensors.from_proto(request.parity_output, "parity_output")
        available = [tensors.from_proto(t, f"available_outputs[{i}]")
                     for i, t in enumerate(request.available_outputs)]
        reconstruction, decode_us = await self.core.decode(parity_output, available)
        reply = pb.DecodeResponse(decode_us=decode_us)
        tensors.to_proto(reconstruction, reply.reconstruction)
        return reply
