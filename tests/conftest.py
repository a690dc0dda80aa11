"""Suite-wide fixtures: every test must leave no child process behind."""

import psutil
import pytest


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
    """Real ONNX models trained with tiny settings (``models.build --tiny``)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-artifacts")
    subprocess.run([sys.executable, "-m", "models.build", "--out", str(out), "--tiny"], check=True,
                   stdout=subprocess.DEVNULL)
    return str(out)
