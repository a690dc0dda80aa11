"""Fixtures for the namespace testbed: skip without privileges, fail on leftovers."""

import subprocess

import pytest

from deploy.netns import TestbedUnavailable, require_netns


def _root_network_state():
    """What a testbed could leave behind in the root namespace: namespaces and links."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return (
        sorted(line.split()[0] for line in namespaces.splitlines() if line.strip()),
        sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
    )


@pytest.fixture
def netns():
    """Skips without root/iproute2; fails a test that leaves a namespace or link behind."""
    try:
        require_netns()
    except TestbedUnavailable as exc:
        pytest.skip(str(exc))
    before = _root_network_state()
    yield
    after = _root_network_state()
    assert after == before, f"testbed left namespaces/links behind: {before} -> {after}"
