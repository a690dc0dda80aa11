"""The suite's own guards: the leaked-task check and what a started process leaves behind."""

import asyncio
import pathlib
import sys
import tempfile

import pytest

from services.common.procs import ServiceProcess, ServiceStartError
from tests.leaks import checked_run


def test_a_task_left_pending_fails_the_run_and_is_cancelled():
    state = {}

    async def leaky():
        async def forever():
            try:
                await asyncio.sleep(3600)
            finally:
                state["cancelled"] = True

        asyncio.get_running_loop().create_task(forever())
        return 1

    with pytest.raises(AssertionError, match=r"left tasks pending: \[.*forever"):
        checked_run(leaky())
    assert state == {"cancelled": True}


def test_a_clean_run_passes_its_result_through():
    async def clean():
        await asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
        return 7

    assert checked_run(clean()) == 7


def _parm_entries():
    return {p.name for p in pathlib.Path(tempfile.gettempdir()).iterdir() if p.name.startswith("parm-")}


def test_a_stopped_process_leaves_no_temporary_directory_but_keeps_its_log_tail():
    before = _parm_entries()
    script = ("import json, os, signal, sys, time; path = sys.argv[sys.argv.index('--ready-file') + 1]; "
              "print('hello from the child', flush=True); "
              "json.dump({'port': 1}, open(path + '.tmp', 'w')); os.replace(path + '.tmp', path); "
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)")
    proc = ServiceProcess([sys.executable, "-c", script], name="hygiene")
    during = _parm_entries() - before
    assert proc.stop() == 0
    assert len(during) == 1 and next(iter(during)).startswith("parm-hygiene-")
    assert _parm_entries() == before
    assert "hello from the child" in proc.tail_log()


def test_a_failed_start_leaves_no_temporary_directory():
    before = _parm_entries()
    with pytest.raises(ServiceStartError, match="exited with code 3 before it was ready:\nbroken"):
        ServiceProcess([sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"], name="hygiene-fail")
    assert _parm_entries() == before


def test_ctrl_c_in_a_runner_stops_its_children_and_removes_their_directories(tmp_path):
    """A runner interrupted by Ctrl-C (SIGINT) leaves no child and no ``parm-*`` directory."""
    import os
    import signal
    import subprocess

    import psutil

    runner = (
        "import sys, time\n"
        "from services.common.procs import ServiceProcess\n"
        "script = (\"import json, os, sys, time; p = sys.argv[sys.argv.index('--ready-file') + 1]; \"\n"
        "          \"json.dump({'port': 1}, open(p + '.tmp', 'w')); os.replace(p + '.tmp', p); time.sleep(600)\")\n"
        "child = ServiceProcess([sys.executable, '-c', script], name='ctrl-c')\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    work = tmp_path / "tmp"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TMPDIR=str(work)), cwd=os.getcwd())
    try:
        child_pid = int(proc.stdout.readline())
        during = [p.name for p in work.iterdir()]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(during) == 1 and during[0].startswith("parm-ctrl-c-")
    assert proc.returncode != 0  # the KeyboardInterrupt
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert [p.name for p in work.iterdir() if p.name != ".ses"] == []
