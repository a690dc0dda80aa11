"""The preflight check and the command line: one clear line, never a traceback."""

import os
import pathlib
import shutil
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


def test_cli_check_without_ip_on_path_prints_one_line_and_exits_2(tmp_path):
    proc = cli("check", env=dict(os.environ, PATH=str(tmp_path)))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netns: the netns testbed needs root"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_cli_check_as_an_unprivileged_user_prints_one_line_and_exits_2():
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    proc = cli("check", prefix=drop, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "netns: the netns testbed needs root or CAP_NET_ADMIN and iproute2 (ip, tc) (this process has neither); "
        'run the emulated network instead: make local (config "network": "emulated")'
    ]


def test_cli_check_with_privileges(netns):
    proc = cli("check")
    assert (proc.returncode, proc.stdout.strip()) == (0, "netns testbed: available")


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
