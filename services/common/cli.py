"""The one shape of every entry point (``python -m services.coder``, ``deploy.certs``, ...).

Every ``main(argv=None)`` in the project is::

    def main(argv=None):
        return cli.run_main(_main, argv, prog="python -m package.module")

where ``_main(argv)`` parses its flags with ``cli.ArgumentParser`` (or a
``parse_config`` built on it) and returns an exit status (None means 0).
``run_main`` turns what can go wrong into the project's exit convention:

| what | stderr | exit |
|---|---|---|
| a usage mistake (argparse, or ``UsageError`` from a check of the flags) | ``PROG: error: MESSAGE`` (one line) | 2 |
| a runtime failure (``Failure``, or one of ``runtime_errors``) | ``PROG: error: MESSAGE`` (one line) | 1 |
| Ctrl-C (``KeyboardInterrupt``) | ``PROG: interrupted`` | 130 |

Anything else is a bug and keeps its traceback. ``PARM_DEBUG=1`` re-raises
usage and runtime errors too, for debugging. Logging is set up once, by
``setup_logging`` (which ``run_main`` does not call: a service calls it once
its config is parsed, so ``--log-level`` applies); ``asyncio.run`` is called
once, by ``run_async``.

``--help`` shows each default once: ``HelpFormatter`` appends
``(default: X)`` only where the help text does not already name a default,
and never for flags (``store_true``/``store_false``/``store_const``) or a
default of None.
"""

import argparse
import asyncio
import logging
import os
import sys

__all__ = ["PORT", "ArgumentParser", "Failure", "HelpFormatter", "UsageError", "number", "run_async",
           "run_main", "setup_logging"]


class UsageError(ValueError):
    """A command-line mistake: one line on stderr, exit 2."""


class Failure(RuntimeError):
    """A runtime failure the user can act on (a missing file, a refused start): one line, exit 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in ``--help`` once, and never a misleading one for flags."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ``UsageError`` (one line, exit 2 through ``run_main``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def number(kind=float, *, at_least=None, above=None, at_most=None):
    """An argparse ``type=``: a ``kind`` (int or float) within bounds.

    A mistake reads ``argument --flag: must be >= 1, got 0`` (or ``not an
    integer: 'x'``), one line through ``ArgumentParser``.
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if value != value:  # NaN
            raise argparse.ArgumentTypeError(f"not a number: {text!r}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


#: A TCP port flag (0 = a free port).
PORT = number(int, at_least=0, at_most=65535)


def setup_logging(level="INFO"):
    """Configures the root logger once per process (``level``: a name like ``INFO``)."""
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_async(coro):
    """Runs the entry point's top-level coroutine (the one ``asyncio.run`` of a process)."""
    return asyncio.run(coro)


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def run_main(main, argv, prog, *, runtime_errors=(OSError,), usage_errors=()):
    """Calls ``main(argv)`` and maps its failures to the exit convention above.

    Args:
        main: ``main(argv) -> int | None``.
        argv: the arguments, or None for ``sys.argv[1:]``.
        prog: the program's name in messages (``python -m deploy.certs``).
        runtime_errors: exception types that are runtime failures (exit 1)
            besides ``Failure``.
        usage_errors: exception types that are usage mistakes (exit 2)
            besides ``UsageError``.

    Returns:
        The exit status (``sys.exit(main())`` in ``__main__``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(os.environ.get("PARM_DEBUG"))
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except (UsageError, *usage_errors) as exc:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except (Failure, *runtime_errors) as exc:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 1
    return 0 if rc is None else int(rc)
