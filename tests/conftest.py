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
