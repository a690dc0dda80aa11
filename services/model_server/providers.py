"""Choosing ONNX Runtime execution providers.

``select_providers(requested, available)`` is pure: ``available`` is what
``onnxruntime.get_available_providers()`` returns.

| requested | CUDA available | providers |
|---|---|---|
| ``auto`` | yes | CUDA, CPU |
| ``auto`` | no | CPU |
| ``cpu`` | either | CPU |
| ``cuda`` | yes | CUDA, CPU |
| ``cuda`` | no | ``ProviderError`` |

CPU stays last in the CUDA list as ONNX Runtime's fallback for operators
CUDA does not implement. The provider actually in use is the session's first
(``session.get_providers()[0]``), which the server logs and reports.

``select_input_memory(requested, provider)`` is pure too: where the runner
puts a batch before ONNX Runtime reads it, given the provider in use.

| requested | provider in use | input memory |
|---|---|---|
| ``auto`` | CUDA | ``pinned`` (CUDA page-locked host memory, bound with I/O binding) |
| ``auto`` | anything else | ``pageable`` (``session.run`` on the numpy array, as always) |
| ``pageable`` | any | ``pageable`` |
| ``pinned`` | CUDA | ``pinned`` |
| ``pinned`` | anything else | ``ProviderError`` |
"""

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CHOICES = ("auto", "cpu", "cuda")
INPUT_MEMORY_CHOICES = ("auto", "pageable", "pinned")


class ProviderError(ValueError):
    """The requested provider is unknown or not available."""


def select_providers(requested, available):
    """Returns the provider list to create the session with.

    Args:
        requested: "auto" | "cpu" | "cuda".
        available: sequence of provider names (``get_available_providers()``).

    Raises:
        ProviderError: unknown choice, or "cuda" when CUDA is not available.
    """
    available = list(available)
    if requested not in CHOICES:
        raise ProviderError(f"provider {requested!r} not in {CHOICES}")
    has_cuda = CUDA in available
    if requested == "cpu" or (requested == "auto" and not has_cuda):
        return [CPU]
    if not has_cuda:
        raise ProviderError(
            f"--provider cuda: {CUDA} is not available (available: {', '.join(available) or 'none'}); "
            "install onnxruntime-gpu with a matching CUDA, or use --provider cpu/auto"
        )
    return [CUDA, CPU]


def short_name(provider):
    """"CUDAExecutionProvider" -> "cuda"."""
    return provider.removesuffix("ExecutionProvider").lower()


def select_input_memory(requested, provider):
    """Returns "pinned" or "pageable" for a session whose provider in use is ``provider``.

    Raises:
        ProviderError: unknown choice, or "pinned" without CUDA.
    """
    if requested not in INPUT_MEMORY_CHOICES:
        raise ProviderError(f"input memory {requested!r} not in {INPUT_MEMORY_CHOICES}")
    if requested == "pageable":
        return "pageable"
    if provider == CUDA:
        return "pinned"
    if requested == "pinned":
        raise ProviderError(f"pinned input memory needs {CUDA}; the session uses {provider}")
    return "pageable"
