"""The gRPC adapter of the model server: parse -> core -> reply."""

from parm.v1 import model_server_pb2 as pb
from parm.v1 import model_server_pb2_grpc as pb_grpc
from services.common import tensors
from services.model_server.perturbation import PerturbationSpec

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelServer"].full_name


class ModelServerServicer(pb_grpc.ModelServerServicer):
    """Thin servicer over a ``ModelInstance``; errors map in the interceptor."""

    def __init__(self, instance, info):
        self.instance = instance
        # Static facts for GetInfo: model_name, manifest_json, provider, available_providers.
        self.info = info

    async def Infer(self, request, context):
        batch = tensors.from_proto(request.input, "input")
        result = await self.instance.infer(batch)
        reply = pb.InferResponse(
            batch_id=request.batch_id,
            inference_ms=result.inference_ms,
            emulated_ms=result.emulated_ms,
            perturbation_ms=result.perturbation_ms,
            instance_id=self.instance.instance_id,
        )
        tensors.to_proto(result.output, reply.output)
        return reply

    async def GetInfo(self, request, context):
        inst = self.instance
        reply = pb.GetInfoResponse(
            instance_id=inst.instance_id,
            role=inst.role,
            k=inst.k,
            served=inst.served,
            failed=inst.failed,
            **self.info,
        )
        inst.perturbations.current.to_proto(reply.perturbation)
        inst.compute.to_proto(reply.emulated_compute)
        return reply

    async def SetPerturbation(self, request, context):
        controller = self.instance.perturbations
        if request.clear:
            spec = controller.clear()
        else:
            spec = controller.set(PerturbationSpec.from_proto(request.perturbation))
        reply = pb.SetPerturbationResponse()
        spec.to_proto(reply.perturbation)
        return reply
