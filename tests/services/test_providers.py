"""Provider selection: a pure function over fake provider lists."""

import pytest

from services.model_server.providers import CPU, CUDA, ProviderError, select_providers, short_name

WITH_CUDA = ["TensorrtExecutionProvider", CUDA, CPU]
CPU_ONLY = ["AzureExecutionProvider", CPU]


def test_auto_prefers_cuda_with_cpu_fallback():
    assert select_providers("auto", WITH_CUDA) == [CUDA, CPU]


def test_auto_without_cuda_is_cpu():
    assert select_providers("auto", CPU_ONLY) == [CPU]


@pytest.mark.parametrize("available", [WITH_CUDA, CPU_ONLY])
def test_cpu_forces_cpu(available):
    assert select_providers("cpu", available) == [CPU]


def test_cuda_when_available():
    assert select_providers("cuda", WITH_CUDA) == [CUDA, CPU]


def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ProviderError, match=r"--provider cuda: CUDAExecutionProvider is not available "
                                            r"\(available: AzureExecutionProvider, CPUExecutionProvider\)"):
        select_providers("cuda", CPU_ONLY)


def test_unknown_choice():
    with pytest.raises(ProviderError, match="'tpu' not in"):
        select_providers("tpu", WITH_CUDA)


def test_short_name():
    assert short_name(CUDA) == "cuda"
    assert short_name(CPU) == "cpu"


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.skipif(CUDA in __import__("onnxruntime").get_available_providers(), reason="CUDA is available")
def test_strict_runner_refuses_a_silent_fallback(tiny_model):
    """ONNX Runtime falls back to CPU when CUDA cannot be used; --provider cuda must not."""
    from services.common.manifest import load
    from services.model_server.runner import OnnxRunner

    manifest = load(tiny_model)
    loose = OnnxRunner(manifest, [CUDA, CPU])
    assert loose.provider == CPU  # this machine has no usable CUDA
    with pytest.raises(ProviderError, match="requested CUDAExecutionProvider, but ONNX Runtime created"):
        OnnxRunner(manifest, [CUDA, CPU], strict=True)
    assert OnnxRunner(manifest, [CPU], strict=True).provider == CPU


# --- input memory: pinned on CUDA, pageable elsewhere

from services.model_server.providers import select_input_memory  # noqa: E402


@pytest.mark.parametrize("requested, provider, expected", [
    ("auto", CUDA, "pinned"), ("auto", CPU, "pageable"), ("auto", "TensorrtExecutionProvider", "pageable"),
    ("pageable", CUDA, "pageable"), ("pageable", CPU, "pageable"), ("pinned", CUDA, "pinned"),
])
def test_select_input_memory(requested, provider, expected):
    assert select_input_memory(requested, provider) == expected


def test_pinned_without_cuda_is_a_clear_error():
    with pytest.raises(ProviderError, match="pinned input memory needs CUDAExecutionProvider; "
                                            "the session uses CPUExecutionProvider"):
        select_input_memory("pinned", CPU)


def test_unknown_input_memory():
    with pytest.raises(ProviderError, match="'locked' not in"):
        select_input_memory("locked", CUDA)
