"""Command-line plumbing of ``models.train``, ``evaluate``, ``export``, ``build`` and ``seeds``.

The project's one entry-point shape (``services.common.cli``), with the
models' reading of which mistakes are the user's: bad input (an unknown
dataset, a missing checkpoint or manifest, a mismatched k, ...: ``ValueError``,
``KeyError``, ``OSError``) ends the program with ONE line on stderr naming
the problem and exit status 2; never a traceback. Ctrl-C exits 130.
``PARM_DEBUG=1`` re-raises instead, for debugging.
"""

import os

from services.common.cli import ArgumentParser, run_main

__all__ = ["ArgumentParser", "default_threads", "run"]


def run(main, argv, prog):
    """Calls ``main(argv)``; bad input becomes one line on stderr and exit 2."""
    return run_main(main, argv, prog, usage_errors=(ValueError, KeyError, OSError))


def default_threads():
    """Torch/ONNX Runtime threads unless told: this project's machines have 2 cores."""
    return max(1, min(2, os.cpu_count() or 1))
