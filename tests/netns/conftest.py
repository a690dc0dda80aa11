"""Fixtures for the namespace testbed: skip without privileges, fail on leftovers."""

import os
import re
import subprocess

import psutil
import pytest

from deploy.network.netns import TestbedUnavailable, require_netns
from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending

# What a testbed creates in the root namespace's view: namespaces
# parm-<pid>-<n>-{br,h<i>} (parm-probe-<pid> for the preflight) and control links pm<pid>c<n>.
_OURS = re.compile(r"^(?:parm-(?:probe-)?(\d+)-.*|parm-probe-(\d+)|pm(\d+)c\d+)$")


def _root_network_state():
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in namespaces.splitlines() if line.strip()} | {
        line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
    }


def _made_by_this_test_run(name):
    """True for a testbed name whose creator is this process, one of its children, or dead.

    A testbed of another live process (a concurrent run on this machine) is not ours.
    """
    match = _OURS.match(name)
    if not match:
        return False
    pid = int(next(g for g in match.groups() if g))
    if pid == os.getpid() or not psutil.pid_exists(pid):
        return True
    return pid in {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def netns():
    """Skips without root/iproute2; fails a test that leaves a namespace or link behind."""
    try:
        require_netns()
    except TestbedUnavailable as exc:
        pytest.skip(str(exc))
    before = _root_network_state()
    yield
    left = sorted(n for n in _root_network_state() - before if _made_by_this_test_run(n))
    assert not left, f"testbed left namespaces/links behind: {left}"
