"""The ONNX runner: one ONNX Runtime session and the input checks for it.

No grpc here. ``OnnxRunner.validate`` checks a batch against the manifest
(dtype, per-example shape, batch size) and raises ``InvalidInput`` naming the
mismatch; ``OnnxRunner.run`` is blocking (callers run it in an executor).

Input memory (``providers.select_input_memory``): on the CPU provider a batch
goes to ``session.run`` as the numpy array it arrived as, exactly as before.
On the CUDA provider the runner copies it into CUDA pinned (page-locked,
"host accessible") memory that ONNX Runtime allocated, and binds that with an
I/O binding, so the host-to-device copy is a DMA from locked pages rather
than a staged copy out of pageable memory (``PinnedInputs``). If this
onnxruntime cannot allocate pinned memory, ``auto`` logs why and stays
pageable (``input_memory``/``input_memory_reason`` say so); an explicit
``pinned`` fails instead.
"""

import collections
import logging
import threading

import numpy as np

from services.common.errors import InvalidInput
from services.model_server.providers import CUDA, ProviderError, select_input_memory

log = logging.getLogger(__name__)


def cuda_pinned_allocator(ort, device_id=0):
    """``allocate(shape, dtype) -> OrtValue`` in CUDA pinned host memory.

    Asks ONNX Runtime's CUDA execution-provider device for its
    HOST_ACCESSIBLE memory (what older releases called ``CUDA_PINNED``) and
    allocates OrtValues there; ``ortvalue.update_inplace(array)`` fills one
    with a host memcpy.

    Raises:
        ProviderError: this onnxruntime lists no CUDA device, or lacks the
            memory-info API (onnxruntime < 1.23).
    """
    memory_type = getattr(ort, "OrtDeviceMemoryType", None)
    if memory_type is None or not hasattr(ort, "get_ep_devices"):
        raise ProviderError(f"onnxruntime {ort.__version__} has no OrtDeviceMemoryType/get_ep_devices "
                            "(pinned inputs need onnxruntime-gpu >= 1.23)")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == CUDA]
    if len(devices) <= device_id:
        raise ProviderError(f"onnxruntime lists {len(devices)} {CUDA} device(s); "
                            f"no device {device_id} to allocate pinned memory for")
    info = devices[device_id].memory_info(memory_type.HOST_ACCESSIBLE)

    def allocate(shape, dtype):
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, memory_info=info)

    return allocate


class PinnedInputs:
    """Runs batches through an I/O binding whose input lives in pinned host memory.

    Ownership: each executor thread has its own I/O binding and its own
    pinned OrtValues, one per batch size (``(B, *input_shape)``; the
    ``max_shapes`` most recently used sizes are kept, older ones are freed).
    A value is written (``update_inplace``) and read by ONNX Runtime within
    one ``run`` call on its thread, and ``copy_outputs_to_cpu`` returns fresh
    arrays, so nothing a caller holds ever points into pinned memory.

    Args:
        session: the ``InferenceSession``.
        input_name, output_name: the model's input and output.
        dtype: the input dtype.
        allocate: ``allocate(shape, dtype) -> OrtValue`` (``cuda_pinned_allocator``).
        max_shapes: batch sizes kept per thread.
    """

    def __init__(self, session, input_name, output_name, dtype, allocate, *, max_shapes=8):
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self.dtype = np.dtype(dtype)
        self.allocate = allocate
        self.max_shapes = int(max_shapes)
        self._local = threading.local()

    def _state(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = (self.session.io_binding(), collections.OrderedDict())
        return state

    def run(self, batch):
        """Blocking inference from pinned memory: ndarray (B, *S) -> ndarray (B, *O)."""
        binding, values = self._state()
        shape = batch.shape
        value = values.get(shape)
        if value is None:
            value = values[shape] = self.allocate(shape, self.dtype)
            while len(values) > self.max_shapes:
                values.popitem(last=False)
        else:
            values.move_to_end(shape)
        value.update_inplace(np.ascontiguousarray(batch))
        binding.bind_ortvalue_input(self.input_name, value)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


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
        input_memory: "auto" | "pageable" | "pinned"
            (``providers.select_input_memory``).
        make_session: ``(path, sess_options, providers) -> session``
            (default ``onnxruntime.InferenceSession``; tests pass fakes).
        pinned_allocator: ``allocate(shape, dtype) -> OrtValue`` for pinned
            inputs (default ``cuda_pinned_allocator``).
    """

    def __init__(self, manifest, providers, *, intra_op_threads=1, max_batch=0, strict=False,
                 input_memory="auto", make_session=None, pinned_allocator=None):
        import onnxruntime as ort

        self.manifest = manifest
        self.max_batch = int(max_batch)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        make_session = make_session or (lambda path, sess_options, providers: ort.InferenceSession(
            path, sess_options=sess_options, providers=providers))
        self.session = make_session(manifest.onnx_path, opts, list(providers))
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
        self.input_memory, self.input_memory_reason = self._choose_input_memory(
            input_memory, ort, pinned_allocator)

    def _choose_input_memory(self, requested, ort, allocator):
        self._pinned = None
        choice = select_input_memory(requested, self.provider)
        if choice == "pageable":
            return "pageable", f"provider {self.provider}" if requested == "auto" else "requested"
        try:
            allocate = allocator or cuda_pinned_allocator(ort)
            allocate((1, *self.input_shape), self.input_dtype)  # fails here, not on the first query
        except Exception as exc:  # noqa: BLE001 - any allocation failure means "no pinned memory"
            if requested == "pinned":
                raise ProviderError(f"pinned input memory unavailable: {exc}") from exc
            log.warning("pinned input memory unavailable (%s); inputs stay in pageable memory", exc)
            return "pageable", f"pinned unavailable: {exc}"
        self._pinned = PinnedInputs(self.session, self.input_name, self.output_name,
                                    self.input_dtype, allocate)
        return "pinned", f"provider {self.provider}"

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
        if self._pinned is not None:
            return self._pinned.run(batch)
        return self.session.run([self.output_name], {self.input_name: batch})[0]
