"""Real shuffles over the shaped links: bytes on the wire, rate, queueing delay."""

import asyncio
import statistics
import time

import pytest

from deploy.runner.launcher import Started
from deploy.network.netns import NetnsLauncher, Testbed, TestbedSpec
from deploy.network.shuffle import ShuffleCoordinator
from services.common.procs import ServiceStartError

RATE_MBIT = 100.0


@pytest.fixture
def agents(netns):
    """A 3-host testbed with a shuffle agent on every host (addresses in host order)."""
    with Testbed(TestbedSpec(3, rate_mbit=RATE_MBIT)) as tb, NetnsLauncher(tb) as launcher:
        started = [
            launcher.start("deploy.network.shuffle", ["agent", "--host", launcher.bind_address(i)], name=f"agent{i}", host=i)
            for i in range(3)
        ]
        yield tb, launcher, started


async def echo_ms(address, nbytes=1000):
    """One small request/response to an agent (``DATA``): connect, send, read the echo."""
    host, _, port = address.rpartition(":")
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"DATA {nbytes}\n".encode() + bytes(nbytes))
        await writer.drain()
        await reader.readexactly(nbytes)
    finally:
        writer.close()
    return (time.perf_counter() - start) * 1e3


def test_agents_listen_on_their_host_address(agents):
    tb, launcher, started = agents
    assert [s.address.rpartition(":")[0] for s in started] == [tb.host_address(i) for i in range(3)]
    assert [s.host for s in started] == [0, 1, 2] and all(s.alive() for s in started)
    assert launcher.host_addresses == [tb.host_address(i) for i in range(3)]


def test_a_shuffle_moves_its_bytes_over_the_shaped_links_at_the_shaped_rate(agents):
    tb, _, started = agents
    nbytes = 4_000_000
    before = tb.link_stats()

    async def run():
        coordinator = ShuffleCoordinator([s.address for s in started], n=0)
        start = time.perf_counter()
        moved = await coordinator.shuffle_once(0, 1, nbytes)
        return moved, time.perf_counter() - start

    moved, elapsed_s = asyncio.run(run())
    after = tb.link_stats()
    assert moved == 2 * nbytes
    grew = {(i, d): getattr(after[i], d).bytes - getattr(before[i], d).bytes for i in range(3) for d in ("up", "down")}
    # Host 0 sent nbytes and got them back; host 1 the other way round.
    # Frames carry headers, so the wire counts exceed the payload, by < 10 %.
    for key in ((0, "up"), (1, "down"), (1, "up"), (0, "down")):
        assert nbytes <= grew[key] < 1.1 * nbytes, (key, grew)
    # Host 2 took no part: only stray broadcasts (ARP) on its link.
    assert grew[(2, "up")] < 10_000 and grew[(2, "down")] < 100_000, grew
    # Each direction went through a 100 Mbit/s bucket, one after the other, so
    # the transfer cannot beat the shaped rate (unshaped veth would be many
    # Gbit/s); it should come close (loose: 2 busy cores are shared).
    rate_mbit = moved * 8 / elapsed_s / 1e6
    assert 0.3 * RATE_MBIT < rate_mbit < 1.05 * RATE_MBIT, rate_mbit
    # The queues filled: TCP overran the sender's bucket and lost packets.
    assert after[0].up.drops + after[1].up.drops > before[0].up.drops + before[1].up.drops


def test_a_small_request_waits_behind_a_shuffle_into_its_host(agents):
    tb, _, started = agents
    target = started[1].address

    async def run():
        coordinator = ShuffleCoordinator([s.address for s in started], n=0)
        idle, busy = [], []
        for _ in range(3):  # repeated rounds: robust to a stray slow sample
            for _ in range(15):
                idle.append(await echo_ms(target))
                await asyncio.sleep(0.005)
            shuffle = asyncio.ensure_future(coordinator.shuffle_once(0, 1, 3_000_000))
            await asyncio.sleep(0.05)  # let the transfer reach full speed
            while not shuffle.done():
                busy.append(await echo_ms(target))
                await asyncio.sleep(0.005)
            await shuffle
        return idle, busy

    idle, busy = asyncio.run(run())
    assert len(busy) >= 10
    idle_ms, busy_ms = statistics.median(idle), statistics.median(busy)
    # A full 10 ms queue sits on the path of either the request or the echo;
    # idle the round trip is well under a millisecond plus CPU noise.
    assert busy_ms > idle_ms + 1.5 and busy_ms > 1.5 * idle_ms, (idle_ms, busy_ms)


def test_a_failed_start_raises_and_leaves_nothing(netns):
    with Testbed(TestbedSpec(1)) as tb, NetnsLauncher(tb) as launcher:
        with pytest.raises(ServiceStartError, match="exited"):
            launcher.start("deploy.network.shuffle", ["no-such-command"], name="bad", host=0)
        started = launcher.start("deploy.network.shuffle", ["agent", "--host", launcher.bind_address(0)], name="ok", host=0)
        assert isinstance(started, Started)
        started.kill()
        assert not started.alive()
