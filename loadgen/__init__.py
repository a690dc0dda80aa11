"""Open-loop load generator for a ParM frontend (see docs/loadgen.md).

Public API (imported lazily, so ``import loadgen`` loads neither grpc nor
numpy): ``Spec``, ``run``, ``run_async``, ``run_remote``, ``summarize``.
"""

_EXPORTS = {
    "Spec": "loadgen.runner",
    "RunResult": "loadgen.runner",
    "run": "loadgen.runner",
    "run_async": "loadgen.runner",
    "run_remote": "loadgen.control",
    "run_remote_async": "loadgen.control",
    "summarize": "loadgen.stats",
    "Record": "loadgen.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loadgen' has no attribute {name!r}")
