"""A runner interrupted with Ctrl-C leaves nothing; one killed with -9 is cleaned up."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parents[2]

RUNNER = """
import sys, time
from deploy.network.netns import NetnsLauncher, Testbed, TestbedSpec
with Testbed(TestbedSpec(2)) as tb, NetnsLauncher(tb) as launcher:
    agent = launcher.start("deploy.network.shuffle", ["agent", "--host", launcher.bind_address(1)], name="agent", host=1)
    print(tb.prefix, tb.control_link, agent.pid, flush=True)
    time.sleep(120)
"""


def start_runner(tmp_path):
    # Its own temporary directory: a runner killed with -9 cannot remove its
    # processes' folders there, and pytest removes tmp_path.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    prefix, control_link, agent_pid = proc.stdout.readline().split()
    return proc, prefix, control_link, int(agent_pid)


def leftovers(prefix, control_link):
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in namespaces.splitlines() if line.startswith(prefix + "-")] + (
        [control_link] if f" {control_link}@" in links or f" {control_link}:" in links else []
    )


def wait_gone(pid, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ctrl_c_tears_everything_down(netns, tmp_path):
    proc, prefix, control_link, agent_pid = start_runner(tmp_path)
    assert len(leftovers(prefix, control_link)) == 4  # bridge, 2 hosts, control link
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0  # KeyboardInterrupt
    assert leftovers(prefix, control_link) == []
    assert wait_gone(agent_pid)
    assert list(tmp_path.iterdir()) == []  # the runner removed its processes' folders


def test_cleanup_after_kill_9_removes_namespaces_and_processes(netns, tmp_path):
    proc, prefix, control_link, agent_pid = start_runner(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    # The runner had no chance to clean up: its testbed and agent are still there.
    assert len(leftovers(prefix, control_link)) == 4 and psutil.pid_exists(agent_pid)
    out = subprocess.run([sys.executable, "-m", "deploy.network.netns", "cleanup"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "removed 3 stale namespace(s)", out
    assert wait_gone(agent_pid)
    # Deleting the bridge namespace deleted the control link's peer, and so the link.
    deadline = time.monotonic() + 10
    while leftovers(prefix, control_link) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(prefix, control_link) == []


def test_a_testbed_left_up_is_removed_at_interpreter_exit(netns):
    script = (
        "from deploy.network.netns import Testbed, TestbedSpec\n"
        "tb = Testbed(TestbedSpec(2)).up()\n"
        "print(tb.prefix, tb.control_link, flush=True)\n"
        "raise SystemExit(3)  # no down(), no context manager\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    prefix, control_link = proc.stdout.split()
    assert prefix.startswith("parm-") and leftovers(prefix, control_link) == []
