"""The sandbox: a private user/network/mount/PID namespace set that takes everything with it."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from deploy.network import sandbox
from tests.marks import cmdline

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def kind():
    try:
        return sandbox.mode()
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(str(exc))


def test_argv_makes_every_namespace_and_runs_init():
    user = sandbox.argv(["true"], "userns")
    assert user[:3] == ["unshare", "--user", "--map-root-user"]
    for flag in ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"):
        assert flag in user
    assert user[user.index("-m") + 1:user.index("--")] == ["deploy.network.sandbox", "init"]
    assert user[user.index("--") + 1:] == ["true"]
    assert "--user" not in sandbox.argv(["true"], "root")


def test_sbin_joins_an_ordinary_users_path_once():
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    assert sandbox.add_sbin_to_path(env) == "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    assert sandbox.add_sbin_to_path(env) == env["PATH"]  # idempotent
    root = {"PATH": "/sbin:/usr/bin"}
    assert sandbox.add_sbin_to_path(root) == "/sbin:/usr/bin:/usr/local/sbin:/usr/sbin"  # order kept
    assert sandbox.add_sbin_to_path({}) == "/usr/local/sbin:/usr/sbin:/sbin"


def test_init_refuses_to_run_outside_a_new_pid_namespace():
    proc = subprocess.run([sys.executable, "-m", "deploy.network.sandbox", "init", "--", "true"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "PID 1" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_sandboxed_command_owns_its_network_and_files(kind):
    script = ("echo $PARM_SANDBOX $TMPDIR; ip netns add x && ip netns list; ls /run; "
              "ip -o link show | wc -l; exit 7")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    proc = subprocess.run(sandbox.argv(["sh", "-c", script], kind), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 7, proc.stderr  # the command's status comes back
    lines = proc.stdout.split()
    assert lines[:3] == ["1", "/run/tmp", "x"]
    assert {"netns", "lock", "tmp"} <= set(lines[3:-1])
    assert lines[-1] == "1"  # only lo: the machine's interfaces are not there
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before


def test_killing_unshare_kills_everything_inside(kind):
    proc = subprocess.Popen(sandbox.argv(["sh", "-c", "sleep 300 & echo $!; wait"], kind), cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # the sleep is forked (its pid inside the sandbox); it may not have exec'd yet
        deadline = time.monotonic() + 10
        while True:
            sleepers = [p for p in psutil.Process(proc.pid).children(recursive=True) if cmdline(p)[:1] == ["sleep"]]
            if sleepers or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(sleepers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(sleepers, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_check_says_how(kind):
    proc = subprocess.run([sys.executable, "-m", "deploy.network.sandbox", "check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"sandbox: {kind}")


def _start_agent_in_sandbox():
    code = ("import sys; from deploy.network import sandbox; "
            "sys.exit(sandbox.run_module('deploy.network.shuffle', ['agent']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    tree = psutil.Process(proc.pid)
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # The sandbox's processes come and go while it starts (a fork before an
            # exec exits as a zombie): a child may be gone by the time it is read.
            seen = tree.children(recursive=True)
            agents = [p for p in seen if cmdline(p)[1:4] == ["-m", "deploy.network.shuffle", "agent"]]
            if agents:
                return proc, agents[0]
            time.sleep(0.1)
        pytest.fail("the agent never started in the sandbox")
    except BaseException:
        # Killing unshare (--kill-child) takes the sandbox; then the parent.
        for p in [*seen, tree]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()
        raise


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)])
def test_run_module_forwards_sigterm_and_dies_whole_on_sigkill(kind, sig, status):
    proc, agent = _start_agent_in_sandbox()
    try:
        time.sleep(0.5)  # the agent's signal handlers are installed once it listens
        os.kill(proc.pid, sig)
        # SIGTERM: the agent stops cleanly and its status comes back; SIGKILL: the kernel takes it all.
        assert proc.wait(timeout=20) == status
        _, alive = psutil.wait_procs([agent], timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
