"""The preflight check and the command line: one clear line, never a traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

from deploy.network.netns import Testbed, TestbedSpec, TestbedUnavailable, require_netns

REPO = pathlib.Path(__file__).resolve().parents[2]


def cli(*args, env=None, prefix=()):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "deploy.network.netns", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )


def test_missing_iproute2_is_named_with_the_way_out(tmp_path):
    with pytest.raises(TestbedUnavailable) as info:
        require_netns(path=str(tmp_path))
    message = str(info.value)
    assert "(ip, tc not found)" in message
    assert "root or CAP_NET_ADMIN" in message and '"network": "emulated"' in message and "make local" in message
    assert "\n" not in message


def test_missing_privileges_are_named():
    with pytest.raises(TestbedUnavailable, match=r"CAP_NET_ADMIN .*\(this process has neither\)"):
        require_netns(has_net_admin=False)


def test_cli_check_without_ip_on_path_prints_one_line_and_exits_1(tmp_path):
    # iproute2 is nowhere: not on PATH, and no sbin directory for the check to add.
    code = ("import sys; from deploy.network import netns, sandbox; sandbox.SBIN_DIRS = (); "
            "sys.exit(netns.main(['check']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PATH=str(tmp_path)), timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m deploy.network.netns: error: the netns testbed needs root"), proc.stderr
    assert "ip, tc not found" in lines[0] and "Traceback" not in proc.stderr


def test_cli_check_with_privileges(netns):
    proc = cli("check")
    assert (proc.returncode, proc.stdout.strip()) == (0, "netns testbed: available (this process has CAP_NET_ADMIN)")


def test_check_without_privileges_falls_back_to_the_sandbox_or_says_why_both_fail(monkeypatch):
    from deploy.network import netns, sandbox

    monkeypatch.setattr(netns, "_has_net_admin", lambda: False)
    monkeypatch.setattr(sandbox, "mode", lambda: "userns")
    assert netns.check() == "netns testbed: available without root (in an unprivileged user namespace)"

    def refused():
        raise sandbox.SandboxUnavailable("unprivileged user namespaces are not available here (EPERM)")

    monkeypatch.setattr(sandbox, "mode", refused)
    with pytest.raises(TestbedUnavailable) as info:
        netns.check()
    assert "(this process has neither)" in str(info.value) and "EPERM" in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_usage_error_is_not_a_traceback():
    proc = cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_cleanup_removes_namespaces_of_dead_runs_only(netns):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"parm-{dead.pid}-0-br", f"parm-{dead.pid}-0-h0"]
    try:
        for ns in stale:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        with Testbed(TestbedSpec(1)) as live:
            proc = cli("cleanup")
            assert proc.returncode == 0 and proc.stdout.strip() == "removed 2 stale namespace(s)", proc
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert not any(ns in listed for ns in stale)
            assert live.namespaces[0] in listed and live.bridge_namespace in listed
    finally:
        for ns in stale:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
