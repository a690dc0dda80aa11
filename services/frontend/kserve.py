"""Open Inference Protocol (KServe v2) gRPC adapter over the same engine.

``inference.GRPCInferenceService`` on the frontend's port, so clients such as
``tritonclient.grpc`` work unchanged. One model is served: the deployed base
model, under its manifest name, version "1". ``ModelInfer`` takes one input
named "input" of shape [n, *per_example_shape] (raw or typed contents); each
of the n examples is one ParM query (they are batched and coded like any
other), and the reply carries output "output" of shape [n, *output_shape] in
``raw_output_contents`` plus the per-example sources and batch ids as the
string parameters ``parm_sources`` and ``parm_batch_ids``.
"""

import asyncio
import math

import numpy as np

from parm.inference import grpc_service_pb2 as pb
from parm.inference import grpc_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidInput, NotFound
from services.frontend.records import source_name

_V2_DTYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int64": "INT64"}
_CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "UINT8": "uint_contents"}
VERSION = "1"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine, manifest):
        self.engine = engine
        self.manifest = manifest
        self.model = manifest.name
        self.datatype = _V2_DTYPES[manifest.input_dtype]
        self.input_shape = tuple(manifest.input_shape)
        self.dtype = np.dtype(manifest.input_dtype)

    def _check_model(self, name, version):
        if name != self.model:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model!r}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r} (only {VERSION!r})")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.has_role("data"))

    async def ModelReady(self, request, context):
        self._check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.engine.has_role("data"))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="parm-frontend", version="0.1.0", extensions=[])

    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        out_dtype = _V2_DTYPES.get("float32")
        return pb.ModelMetadataResponse(
            name=self.model, versions=[VERSION], platform="parm",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name="input", datatype=self.datatype, shape=[-1, *self.input_shape])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name="output", datatype=out_dtype, shape=[-1, *self.manifest.output_shape])])

    def _parse(self, request):
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly 1 input tensor, got {len(request.inputs)}")
        t = request.inputs[0]
        if t.name != "input":
            raise InvalidInput(f"unknown input {t.name!r} (model {self.model!r} has one input, 'input')")
        if t.datatype != self.datatype:
            raise InvalidInput(f"input {t.name!r}: datatype {t.datatype!r}, expected {self.datatype!r}")
        shape = tuple(t.shape)
        if len(shape) != len(self.input_shape) + 1 or shape[1:] != self.input_shape or shape[0] < 1:
            raise InvalidInput(f"input {t.name!r}: shape {list(shape)}, expected "
                               f"[n, {', '.join(map(str, self.input_shape))}] with n >= 1")
        for o in request.outputs:
            if o.name != "output":
                raise InvalidInput(f"unknown requested output {o.name!r} (only 'output')")
        count = math.prod(shape)        # Python ints: no int64 overflow
        field = _CONTENTS_FIELD.get(self.datatype)
        values = getattr(t.contents, field) if field else ()
        if request.raw_input_contents and len(values):
            raise InvalidInput(f"input {t.name!r}: both raw_input_contents and typed contents are set "
                               "(give one of them)")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput("raw_input_contents must have one entry per input")
            raw = request.raw_input_contents[0]
            if len(raw) != count * self.dtype.itemsize:
                raise InvalidInput(f"input {t.name!r}: {len(raw)} raw bytes, shape {list(shape)} "
                                   f"needs {count * self.dtype.itemsize}")
            return np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).reshape(shape)
        if len(values) != count:
            raise InvalidInput(f"input {t.name!r}: {len(values)} values in contents, shape "
                               f"{list(shape)} needs {count}")
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            low, high = min(values), max(values)
            if low < info.min or high > info.max:
                bad = high if high > info.max else low
                raise InvalidInput(f"input {t.name!r}: value {bad} is out of range for {self.datatype} "
                                   f"[{info.min}, {info.max}]")
        return np.asarray(values, dtype=self.dtype).reshape(shape)

    async def ModelInfer(self, request, context):
        self._check_model(request.model_name, request.model_version)
        array = self._parse(request)
        timeout = context.time_remaining()
        queries = []
        try:
            for row in array:
                queries.append(self.engine.submit(row, request.id, timeout))
            answers = await asyncio.gather(*(q.future for q in queries))
        except BaseException:
            for q in queries:
                self.engine.abandon(q)
            raise
        out = np.stack([a.output for a in answers])
        reply = pb.ModelInferResponse(model_name=self.model, model_version=VERSION, id=request.id)
        reply.outputs.add(name="output", datatype=_V2_DTYPES[out.dtype.name], shape=out.shape)
        reply.raw_output_contents.append(np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes())
        reply.parameters["parm_sources"].string_param = ",".join(source_name(a.source) for a in answers)
        reply.parameters["parm_batch_ids"].string_param = ",".join(str(a.batch_id) for a in answers)
        return reply
