"""Every module of ``services/`` imports first, on its own, in a fresh interpreter.

An import cycle (a policy importing the engine back, say) only fails when the
"wrong" module is imported first; importing each one alone in a new process
is the only order-independent check. Importing must also run nothing (no
server, no client): each import finishes quickly and prints nothing.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def service_modules():
    out = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue                # importing it is running it
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def test_the_list_covers_the_frontend_core():
    mods = service_modules()
    for name in ("services.frontend.engine", "services.frontend.records", "services.frontend.batcher",
                 "services.frontend.redundancy.coded", "services.frontend.redundancy.host"):
        assert name in mods


def test_every_service_module_imports_first_in_a_fresh_interpreter():
    mods = service_modules()
    # one interpreter per module, two at a time (the import is what is tested, not speed)
    failures = []
    procs = []
    for name in mods:
        procs.append((name, subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        if len(procs) >= 2:
            failures += _reap(procs.pop(0))
    for p in procs:
        failures += _reap(p)
    assert not failures, "\n".join(failures)


def _reap(item):
    name, proc = item
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        return [f"{name}: exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"]
    if out.strip():
        return [f"{name}: printed at import: {out.strip()[:200]}"]
    return []
