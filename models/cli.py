"""Command-line plumbing shared by ``models.train``, ``models.evaluate`` and ``models.build``.

Bad input (an unknown dataset, a missing checkpoint, a mismatched k, ...)
ends the program with ONE line on stderr naming the problem and exit status
2; never a traceback. ``PARM_DEBUG=1`` re-raises instead, for debugging.
"""

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(main, argv, prog):
    """Calls ``main(argv)``; domain errors become one line on stderr and exit 2."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except (ValueError, OSError, KeyError) as exc:
        if os.environ.get("PARM_DEBUG"):
            raise
        message = str(exc).replace("\n", " ").strip() or type(exc).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2


def default_threads():
    """Torch/ONNX Runtime threads unless told: this project's machines have 2 cores."""
    return max(1, min(2, os.cpu_count() or 1))
