"""Finding the processes a test started, by an environment marker they inherit."""

import time

import psutil


def marked(mark):
    """Live processes whose environment has ``PARM_TEST_MARK=mark`` (zombies excluded:
    they have exited, only their reaping is pending)."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("PARM_TEST_MARK") == mark and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def cmdline(proc):
    """``proc``'s command line, or [] once it has exited (a zombie, or gone): a
    process seen in a listing can exit before it is read."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def assert_none_left(mark, timeout_s=10.0):
    """Waits up to ``timeout_s`` for the processes marked ``mark`` to end; kills and
    names any still running (a failure)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and marked(mark):
        time.sleep(0.2)
    left = []
    for proc in marked(mark):
        try:
            left.append(proc.cmdline())
            proc.kill()
        except psutil.Error:
            pass
    assert not left, f"left running: {left}"
