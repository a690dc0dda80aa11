"""The testbed's topology, addressing, shaping and teardown (real namespaces)."""

import errno
import ipaddress
import json
import os
import subprocess
import time
import sys

import pytest

from deploy.network.netns import (
    DEFAULT_SHUFFLE_BYTES,
    Testbed,
    TestbedError,
    TestbedSpec,
    _run,
    _used_networks,
    pick_subnet,
    shuffle_bytes_for,
)


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def namespaces():
    return {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


def test_spec_defaults_and_queue_limit():
    spec = TestbedSpec(4)
    assert (spec.rate_mbit, spec.queue_ms, spec.burst_bytes) == (50.0, 10.0, 16384)
    assert spec.limit_bytes == 62_500  # 10 ms at 50 Mbit/s
    assert TestbedSpec(2, rate_mbit=100).limit_bytes == 125_000
    assert DEFAULT_SHUFFLE_BYTES == (3_125_000, 6_250_000)  # 0.5-1 s per direction at 50 Mbit/s
    assert shuffle_bytes_for(200, seconds=(1, 2)) == (25_000_000, 50_000_000)
    assert spec.shuffle_bytes == DEFAULT_SHUFFLE_BYTES
    assert TestbedSpec(2, rate_mbit=100).shuffle_bytes == (6_250_000, 12_500_000)
    assert TestbedSpec(2, rate_mbit=1000, queue_ms=2).limit_bytes == 250_000
    # Never less than two bursts, or tbf could not hold a burst.
    assert TestbedSpec(2, rate_mbit=1, queue_ms=1).limit_bytes == 2 * 16384


@pytest.mark.parametrize("kwargs, message", [
    ({"num_hosts": 0}, "num_hosts"),
    ({"num_hosts": 251}, "num_hosts"),
    ({"num_hosts": 2, "rate_mbit": 0}, "rate_mbit"),
    ({"num_hosts": 2, "queue_ms": -1}, "queue_ms"),
    ({"num_hosts": 2, "burst_bytes": 100}, "burst_bytes"),
    ({"num_hosts": 2, "subnet": "10.1.0.0/16"}, "/24"),
])
def test_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TestbedSpec(**kwargs)


def test_pick_subnet_avoids_every_used_network():
    free = ipaddress.ip_network("10.77.5.0/24")
    used = [n for n in ipaddress.ip_network("10.0.0.0/8").address_exclude(free)]
    assert pick_subnet(used, seed=1) == free
    assert pick_subnet(used, seed=99) == free
    with pytest.raises(TestbedError, match="no free /24"):
        pick_subnet([ipaddress.ip_network("10.0.0.0/8")])


def test_pick_subnet_skips_an_overlapping_route():
    route = ipaddress.ip_network("10.0.0.0/9")
    for seed in range(20):
        got = pick_subnet([route], seed=seed)
        assert not got.overlaps(route) and got.subnet_of(ipaddress.ip_network("10.0.0.0/8"))


def test_up_builds_the_topology_and_down_removes_it(netns):
    used_before = _used_networks(_run)
    tb = Testbed(TestbedSpec(3, rate_mbit=50, queue_ms=8))
    with tb:
        assert set(tb.namespaces) | {tb.bridge_namespace} <= namespaces()
        # The subnet was free before the testbed claimed it.
        assert not any(tb.subnet.overlaps(n) for n in used_before)
        assert [tb.host_address(i) for i in range(3)] == [str(tb.subnet.network_address + i) for i in (1, 2, 3)]
        for i, ns in enumerate(tb.namespaces):
            addrs = json.loads(sh("ip", "-n", ns, "-4", "-j", "addr", "show", "dev", "eth0"))
            assert addrs[0]["addr_info"][0]["local"] == tb.host_address(i)
            # No default route: nothing a host sends can leave the subnet.
            assert "default" not in sh("ip", "-n", ns, "route", "show")
            for qns, dev in ((ns, "eth0"), (tb.bridge_namespace, f"h{i}")):
                (q,) = json.loads(sh("tc", "-n", qns, "-j", "qdisc", "show", "dev", dev))
                assert q["kind"] == "tbf"
                assert q["options"]["rate"] == 50 * 1_000_000 // 8  # bytes/s
        ctl = json.loads(sh("ip", "-4", "-j", "addr", "show", "dev", tb.control_link))
        assert ctl[0]["addr_info"][0]["local"] == tb.control_address == str(tb.subnet.network_address + 254)
        described = tb.describe(stats=True)
        assert (described["network"], described["rate_mbit"], described["queue_limit_bytes"]) == ("netns", 50, 50_000)
        assert described["subnet"] == str(tb.subnet) and len(described["links"]) == 3
        assert set(described["links"][0]["up"]) == {"bytes", "packets", "drops", "overlimits", "backlog_bytes"}
        json.dumps(described)
        stats = tb.link_stats()
        assert [s.host for s in stats] == [0, 1, 2] and all(s.down is not None for s in stats)
    assert not (set(tb.namespaces) | {tb.bridge_namespace}) & namespaces()
    assert tb.control_link not in sh("ip", "-o", "link", "show")
    tb.down()  # idempotent


def test_exception_inside_the_context_still_tears_down(netns):
    tb = Testbed(TestbedSpec(2))
    with pytest.raises(RuntimeError, match="boom"):
        with tb:
            assert tb.namespaces[0] in namespaces()
            raise RuntimeError("boom")
    assert not set(tb.namespaces) & namespaces()


def test_a_failed_up_removes_what_it_made(netns):
    calls = []

    def failing_run(argv, check=True):
        calls.append(argv)
        if argv[:4] == ["tc", "-n", tb.namespaces[1], "qdisc"]:
            return _run(["ip", "netns", "add", "invalid/name"], check=check)  # a real failing command
        return _run(argv, check=check)

    tb = Testbed(TestbedSpec(3, prefix=f"parmtest-{os.getpid()}"), run=failing_run)
    with pytest.raises(TestbedError, match="failed"):
        tb.up()
    # Host 0 and part of host 1 had been made; all of it is gone again.
    assert any(argv[:3] == ["ip", "netns", "add"] and argv[3] == tb.namespaces[1] for argv in calls)
    assert not ({tb.bridge_namespace} | set(tb.namespaces)) & namespaces()


def test_down_kills_processes_left_in_the_namespaces(netns):
    with Testbed(TestbedSpec(2)) as tb:
        proc = subprocess.Popen(tb.exec_argv(1, ["sleep", "300"]))
        # `ip netns exec` enters the namespace a moment after it starts (longer on a loaded machine).
        deadline = time.monotonic() + 10
        while str(proc.pid) not in (pids := sh("ip", "netns", "pids", tb.namespaces[1]).split()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert str(proc.pid) in pids
    assert proc.wait(timeout=10) is not None


def test_hosts_reach_each_other_and_the_root_but_nothing_else(netns):
    code = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(3)\n"
        "try:\n"
        "    s.connect((sys.argv[1], 9))\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    with Testbed(TestbedSpec(2)) as tb:
        def connect(host, addr):
            return sh(*tb.exec_argv(host, [sys.executable, "-c", code, addr])).strip()

        # Outside the subnet: no route at all (the root's own addresses included).
        assert connect(0, "198.51.100.7") == str(errno.ENETUNREACH)
        assert connect(0, "127.0.0.1") == str(errno.ECONNREFUSED)  # its own loopback only
        # Inside: the peer and the root's control address answer (with a reset, port 9 is closed).
        assert connect(0, tb.host_address(1)) == str(errno.ECONNREFUSED)
        assert connect(1, tb.control_address) == str(errno.ECONNREFUSED)


def test_two_testbeds_at_once_get_distinct_names_and_subnets(netns):
    with Testbed(TestbedSpec(1)) as a, Testbed(TestbedSpec(1)) as b:
        assert a.prefix != b.prefix and a.control_link != b.control_link
        assert not a.subnet.overlaps(b.subnet)


def test_a_subnet_in_use_is_refused(netns):
    root_net = _used_networks(_run)[0]  # e.g. 127.0.0.0/8
    busy = ipaddress.ip_network(f"{root_net.network_address}/24", strict=False)
    with pytest.raises(TestbedError, match=f"subnet {busy} is in use"):
        Testbed(TestbedSpec(1, subnet=str(busy))).up()


def test_host_index_is_checked():
    tb = Testbed(TestbedSpec(2, subnet="10.200.1.0/24"))
    assert tb.exec_argv(1, ["true"]) == ["ip", "netns", "exec", tb.namespaces[1], "true"]
    with pytest.raises(IndexError, match="host 2"):
        tb.host_address(2)
