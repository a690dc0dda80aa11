"""Suite-wide fixtures: no child process, no temporary file left behind.

The session runs with a temporary directory of its own (``TMPDIR`` and
``tempfile.tempdir``, inherited by every process the tests start), so the
check of what the suite leaves there sees only the suite: at the end of
the session, anything in it but pytest's own ``tmp_path`` tree (and two
per-user files of ONNX Runtime and torch) fails the run, and the directory is removed
either way.
"""

import getpass
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

_SESSION_TMP = None
_PYTEST_OWN = "pytest-of-"
# Not the project's, and one per user rather than one per run: ONNX Runtime's
# session file (rewritten at import) and torch's compile cache.
_NOT_OURS = {".ses", f"torchinductor_{getpass.getuser()}"}


def pytest_configure(config):
    global _SESSION_TMP
    if _SESSION_TMP is None:
        _SESSION_TMP = tempfile.mkdtemp(prefix="parm-test-session-")
        os.environ["TMPDIR"] = _SESSION_TMP
        tempfile.tempdir = _SESSION_TMP


def pytest_unconfigure(config):
    global _SESSION_TMP
    if _SESSION_TMP is not None:
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)
        _SESSION_TMP = None


@pytest.fixture(scope="session", autouse=True)
def no_temporary_leftovers():
    """Fails the session if the suite leaves anything in the temporary directory."""
    root = pathlib.Path(tempfile.gettempdir())
    before = {p.name for p in root.iterdir()}
    yield
    left = sorted(p.name for p in root.iterdir() if p.name not in before | _NOT_OURS
                  and not p.name.startswith(_PYTEST_OWN))
    assert not left, f"the suite left these in the temporary directory {root}: {left}"


@pytest.fixture(autouse=True)
def no_orphan_processes():
    """Fails a test that leaves a child process of the test runner alive."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(leaked, timeout=5)
    for proc in alive:
        proc.kill()
    assert not alive, f"test left processes running: {[p.cmdline() for p in alive]}"


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """Directory of ``models.build --tiny``: real (inaccurate) ONNX models,
    checkpoints, manifests and the index, trained once per session in a child
    process (torch stays out of the test process)."""
    out = tmp_path_factory.mktemp("tiny-artifacts")
    subprocess.run([sys.executable, "-m", "models.build", "--out", str(out), "--tiny", "--no-progress",
                    "--threads", "1", "--jobs", "2"], check=True, stdout=subprocess.DEVNULL)
    return out
