"""The ONNX runner: one ONNX Runtime session and the input checks for it.

No grpc here. ``OnnxRunner.validate`` checks a batch against the manifest
(dtype, per-example shape, batch size) and raises ``InvalidInput`` naming the
mismatch; ``OnnxRunner.run`` is blocking (callers run it in an executor).
"""

import logging

import numpy as np

from services.common.errors import InvalidInput
from services.model_server.providers import ProviderError

log = logging.getLogger(__name__)


class OnnxRunner:
    """An ONNX Runtime session for one manifest.

    Args:
        manifest: ``services.common.manifest.Manifest``.
        providers: provider list (``providers.select_providers``).
        intra_op_threads: ONNX Runtime intra-op threads.
        max_batch: largest accepted batch (0 = no limit).
        strict: raise ``ProviderError`` if the session does not use
            ``providers[0]`` (ONNX Runtime silently falls back to CPU when,
            e.g., the CUDA libraries cannot be loaded).
    """

    def __init__(self, manifest, providers, *, intra_op_threads=1, max_batch=0, strict=False):
        import onnxruntime as ort

        self.manifest = manifest
        self.max_batch = int(max_batch)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(manifest.onnx_path, sess_options=opts, providers=list(providers))
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        if providers and self.provider != providers[0]:
            if strict:
                raise ProviderError(f"requested {providers[0]}, but ONNX Runtime created the session "
                                    f"with {self.provider} (are the CUDA libraries installed?)")
            log.warning("requested %s but the session uses %s", providers[0], self.provider)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{manifest.onnx_path}: expected 1 input, found {len(inputs)}")
        self.input_name = inputs[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "output" if "output" in outputs else outputs[0]
        self.input_dtype = np.dtype(manifest.input_dtype)
        self.input_shape = tuple(manifest.input_shape)

    def validate(self, batch, what="input"):
        """Raises InvalidInput unless ``batch`` is (B, *input_shape) of the manifest's dtype."""
        if batch.dtype != self.input_dtype:
            raise InvalidInput(
                f"{what}: dtype {batch.dtype.name} does not match the model's {self.input_dtype.name}"
            )
        expected = "(B, " + ", ".join(map(str, self.input_shape)) + ")"
        if batch.ndim != len(self.input_shape) + 1 or tuple(batch.shape[1:]) != self.input_shape:
            raise InvalidInput(
                f"{what}: shape {list(batch.shape)} does not match the model's {expected} "
                f"(per-example shape {list(self.input_shape)} plus a batch dimension)"
            )
        if batch.shape[0] < 1:
            raise InvalidInput(f"{what}: empty batch (shape {list(batch.shape)})")
        if self.max_batch and batch.shape[0] > self.max_batch:
            raise InvalidInput(f"{what}: batch of {batch.shape[0]} exceeds --max-batch {self.max_batch}")

    def run(self, batch):
        """Blocking inference: ndarray (B, *input_shape) -> ndarray (B, *output_shape)."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]
