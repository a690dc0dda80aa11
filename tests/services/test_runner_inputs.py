"""Where the runner puts a batch for ONNX Runtime: pageable on CPU, pinned + I/O binding on CUDA.

There is no GPU here. The CPU path is tested as it runs in production. The
pinned path is tested with a real CPU session dressed as a CUDA one (its
``get_providers`` says CUDA) and CPU OrtValues standing in for pinned ones,
so every I/O binding call is a real ONNX Runtime call; only the allocation in
pinned memory itself (``cuda_pinned_allocator`` on a CUDA machine) is left to
``test_pinned_inputs_on_a_real_gpu``, which runs where CUDA is available.
"""

import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest

from services.common.manifest import load
from services.model_server import runner as runner_module
from services.model_server.providers import CPU, CUDA, ProviderError
from services.model_server.runner import OnnxRunner, PinnedInputs, cuda_pinned_allocator


class SessionSpy:
    """A real InferenceSession that reports ``providers`` and counts I/O binding use."""

    def __init__(self, session, providers):
        self._session = session
        self._providers = providers
        self.bindings = 0
        self.runs = {"run": 0, "run_with_iobinding": 0}

    def get_providers(self):
        return list(self._providers)

    def get_inputs(self):
        return self._session.get_inputs()

    def get_outputs(self):
        return self._session.get_outputs()

    def io_binding(self):
        self.bindings += 1
        return self._session.io_binding()

    def run(self, *args, **kwargs):
        self.runs["run"] += 1
        return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, binding):
        self.runs["run_with_iobinding"] += 1
        return self._session.run_with_iobinding(binding)


class CpuStandIn:
    """``allocate(shape, dtype)`` giving CPU OrtValues (pinned ones need a GPU), recording shapes."""

    def __init__(self):
        self.shapes = []

    def __call__(self, shape, dtype):
        self.shapes.append(tuple(shape))
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cpu")


def _runner(tiny_model, providers, reported, **kwargs):
    spies = []

    def make_session(path, sess_options, providers_):
        spies.append(SessionSpy(ort.InferenceSession(path, sess_options=sess_options,
                                                     providers=[CPU]), reported))
        return spies[0]

    return OnnxRunner(load(tiny_model), providers, make_session=make_session, **kwargs), spies[0]


def _batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 2, 3)).astype(np.float32)


def _expected(tiny_model, batch):
    return ort.InferenceSession(str(load(tiny_model).onnx_path), providers=[CPU]).run(None, {"input": batch})[0]


def test_cpu_path_is_session_run_without_binding(tiny_model):
    runner = OnnxRunner(load(tiny_model), [CPU])
    assert (runner.input_memory, runner.input_memory_reason) == ("pageable", f"provider {CPU}")
    batch = _batch(3)
    np.testing.assert_array_equal(runner.run(batch), _expected(tiny_model, batch))

    spied, spy = _runner(tiny_model, [CPU], [CPU])
    np.testing.assert_array_equal(spied.run(batch), _expected(tiny_model, batch))
    assert spy.bindings == 0 and spy.runs == {"run": 1, "run_with_iobinding": 0}


def test_cuda_session_runs_from_pinned_values_through_a_binding(tiny_model):
    allocate = CpuStandIn()
    runner, spy = _runner(tiny_model, [CUDA, CPU], [CUDA, CPU], pinned_allocator=allocate)
    assert (runner.input_memory, runner.input_memory_reason) == ("pinned", f"provider {CUDA}")
    for n, seed in [(3, 1), (3, 2), (1, 3), (3, 4)]:
        batch = _batch(n, seed)
        np.testing.assert_array_equal(runner.run(batch), _expected(tiny_model, batch))
    assert spy.runs == {"run": 0, "run_with_iobinding": 4}
    assert spy.bindings == 1                      # one binding for this thread, reused
    assert allocate.shapes == [(1, 2, 3), (3, 2, 3), (1, 2, 3)]  # probe, then one per batch size


def test_output_does_not_alias_the_reused_input_value(tiny_model):
    runner, _ = _runner(tiny_model, [CUDA, CPU], [CUDA, CPU], pinned_allocator=CpuStandIn())
    first_batch, second_batch = _batch(2, 5), _batch(2, 6)
    first = runner.run(first_batch)
    kept = first.copy()
    runner.run(second_batch)                      # same (2, 2, 3) value, overwritten
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(first, _expected(tiny_model, first_batch))


def test_pageable_requested_on_cuda_stays_session_run(tiny_model):
    allocate = CpuStandIn()
    runner, spy = _runner(tiny_model, [CUDA, CPU], [CUDA, CPU], pinned_allocator=allocate,
                          input_memory="pageable")
    assert (runner.input_memory, runner.input_memory_reason) == ("pageable", "requested")
    runner.run(_batch(2))
    assert spy.bindings == 0 and allocate.shapes == []


def test_auto_without_pinned_memory_logs_and_stays_pageable(tiny_model, caplog):
    """The real allocator on this CPU-only onnxruntime: no CUDA device to ask."""
    caplog.set_level(logging.WARNING, logger=runner_module.__name__)
    runner, spy = _runner(tiny_model, [CUDA, CPU], [CUDA, CPU])
    assert runner.input_memory == "pageable"
    assert runner.input_memory_reason.startswith("pinned unavailable: onnxruntime lists 0 "
                                                 "CUDAExecutionProvider device(s)")
    assert "pinned input memory unavailable" in caplog.text
    batch = _batch(2)
    np.testing.assert_array_equal(runner.run(batch), _expected(tiny_model, batch))
    assert spy.bindings == 0


def test_explicit_pinned_that_cannot_allocate_fails(tiny_model):
    def broken(shape, dtype):
        raise RuntimeError("cudaHostAlloc: out of memory")

    with pytest.raises(ProviderError, match="pinned input memory unavailable: cudaHostAlloc: out of memory"):
        _runner(tiny_model, [CUDA, CPU], [CUDA, CPU], pinned_allocator=broken, input_memory="pinned")
    with pytest.raises(ProviderError, match="pinned input memory needs CUDAExecutionProvider"):
        _runner(tiny_model, [CPU], [CPU], input_memory="pinned")


def test_each_thread_has_its_own_binding_and_values(tiny_model):
    session = ort.InferenceSession(str(load(tiny_model).onnx_path), providers=[CPU])
    spy = SessionSpy(session, [CUDA, CPU])
    allocate = CpuStandIn()
    pinned = PinnedInputs(spy, "input", "output", np.float32, allocate)
    errors = []

    def work(seed):
        for i in range(30):
            batch = _batch(4, seed * 100 + i)
            if not np.array_equal(pinned.run(batch), _expected_from(session, batch)):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert spy.bindings == 3 and allocate.shapes == [(4, 2, 3)] * 3


def _expected_from(session, batch):
    return session.run(None, {"input": batch})[0]


def test_batch_sizes_kept_are_bounded(tiny_model):
    session = ort.InferenceSession(str(load(tiny_model).onnx_path), providers=[CPU])
    allocate = CpuStandIn()
    pinned = PinnedInputs(session, "input", "output", np.float32, allocate, max_shapes=2)
    for n in (1, 2, 1, 3, 1, 2):
        batch = _batch(n, n)
        np.testing.assert_array_equal(pinned.run(batch), _expected_from(session, batch))
    # 1, 2 allocated; 1 reused; 3 evicts 2; 1 reused; 2 again evicts 3
    assert allocate.shapes == [(1, 2, 3), (2, 2, 3), (3, 2, 3), (2, 2, 3)]


def test_cuda_pinned_allocator_asks_the_cuda_device_for_host_accessible_memory():
    """The allocation calls, against a fake onnxruntime module (the real one needs a GPU)."""
    calls = []

    class MemoryType:
        DEFAULT, HOST_ACCESSIBLE = "default", "host-accessible"

    class Device:
        def __init__(self, ep_name):
            self.ep_name = ep_name

        def memory_info(self, kind):
            return (self.ep_name, kind)

    class OrtValue:
        @staticmethod
        def ortvalue_from_shape_and_type(shape, dtype, memory_info=None):
            calls.append((shape, dtype, memory_info))
            return "value"

    class FakeOrt:
        __version__ = "fake"
        OrtDeviceMemoryType = MemoryType

        def __init__(self, names):
            self.names = names
            self.OrtValue = OrtValue

        def get_ep_devices(self):
            return [Device(n) for n in self.names]

    allocate = cuda_pinned_allocator(FakeOrt([CPU, CUDA]))
    assert allocate((2, 3), np.float32) == "value"
    assert calls == [([2, 3], np.float32, (CUDA, "host-accessible"))]
    with pytest.raises(ProviderError, match="lists 1 CUDAExecutionProvider device\\(s\\); no device 1"):
        cuda_pinned_allocator(FakeOrt([CPU, CUDA]), device_id=1)
    old = FakeOrt([CUDA])
    old.OrtDeviceMemoryType = None
    with pytest.raises(ProviderError, match="pinned inputs need onnxruntime-gpu >= 1.23"):
        cuda_pinned_allocator(old)


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU")
def test_pinned_inputs_on_a_real_gpu(tiny_model):
    """Only on a CUDA machine: ONNX Runtime allocates pinned memory and the outputs match the CPU's."""
    runner = OnnxRunner(load(tiny_model), [CUDA, CPU], strict=True, input_memory="pinned")
    assert runner.input_memory == "pinned"
    for n in (1, 4, 4, 2):
        batch = _batch(n, n)
        np.testing.assert_allclose(runner.run(batch), _expected(tiny_model, batch), rtol=1e-5, atol=1e-5)
