"""The model instance core: inference, emulated compute and perturbations.

No grpc here. ``ModelInstance.infer`` is what the servicer calls; it runs the
blocking ONNX Runtime call in an executor sized at start, and awaits the
emulated compute time and perturbation delays with asyncio.

Device model: ``device_slots`` (the executor size) batches may be "on the
device" at once; a batch holds a slot for its real inference plus its
emulated compute time, so queued batches wait as they would for a busy
accelerator. Perturbation delays are outside the slot (they stand for the
network).
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from services.common.clock import REAL as REAL_CLOCK
from services.common.errors import NoInstance
from services.model_server.distributions import DistSpec, Sampler
from services.model_server.perturbation import PerturbationController

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferResult:
    output: object  # ndarray (B, *output_shape)
    inference_ms: float
    emulated_ms: float
    perturbation_ms: float


class ModelInstance:
    """One served model. ``load(runner)`` makes it ready; ``infer`` serves.

    ``clock`` (a ``services.common.clock.Clock``, default the real one) awaits
    the emulated compute time and runs the perturbations.
    """

    def __init__(self, *, instance_id, role, k=0, compute=DistSpec(), seed=0,
                 device_slots=1, on_stop=None, clock=None):
        self.instance_id = instance_id
        self.role = role
        self.k = k
        self.compute = compute
        self._compute = Sampler(compute)
        self._clock = clock or REAL_CLOCK
        self.perturbations = PerturbationController(seed=seed, clock=self._clock, on_stop=on_stop)
        self.runner = None
        self.device_slots = int(device_slots)
        self._executor = ThreadPoolExecutor(max_workers=self.device_slots, thread_name_prefix="onnx")
        self._slots = asyncio.Semaphore(self.device_slots)
        self.served = 0
        self.failed = 0

    async def load(self, make_runner):
        """Builds the runner (blocking) in the executor; the instance is ready after."""
        loop = asyncio.get_running_loop()
        self.runner = await loop.run_in_executor(self._executor, make_runner)
        return self.runner

    @property
    def ready(self):
        return self.runner is not None

    async def infer(self, batch):
        """Validates and runs one batch.

        Args:
            batch: ndarray (B, *input_shape) of the manifest's dtype (read-only is fine).

        Returns:
            InferResult.

        Raises:
            InvalidInput: wrong dtype/shape/batch size.
            InstanceFailed: injected failure.
            NoInstance: the model is not loaded yet.
        """
        try:
            result = await self._infer(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed += 1
            raise
        self.served += 1
        return result

    async def _infer(self, batch):
        runner = self.runner
        if runner is None:
            raise NoInstance(f"instance {self.instance_id}: model not loaded yet")
        runner.validate(batch)
        await self.perturbations.before_inference()
        loop = asyncio.get_running_loop()
        async with self._slots:
            start = time.perf_counter()
            output = await loop.run_in_executor(self._executor, runner.run, batch)
            inference_ms = (time.perf_counter() - start) * 1000.0
            emulated_ms = self._compute.sample_ms()
            if emulated_ms > 0:
                await self._clock.sleep(emulated_ms / 1000.0)
        perturbation_ms = await self.perturbations.after_inference()
        return InferResult(output, inference_ms, emulated_ms, perturbation_ms)

    def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
