"""Real shuffles between real agent processes on loopback."""

import asyncio

import pytest

from deploy.network.shuffle import ShuffleAgent, ShuffleCoordinator
from services.common.procs import ServiceProcess


@pytest.fixture
def agents():
    procs = [ServiceProcess.python_module("deploy.network.shuffle", ["agent", "--port", "0"], name=f"agent{i}")
             for i in range(3)]
    yield [p.address for p in procs]
    for p in procs:
        p.stop()


def test_one_shuffle_moves_the_bytes_there_and_back(agents):
    coordinator = ShuffleCoordinator(agents, n=1, seed=1)
    moved = asyncio.run(coordinator.shuffle_once(0, 1, 3_000_001))
    assert moved == 6_000_002


def test_coordinator_keeps_n_shuffles_going_and_counts_bytes(agents):
    low, high = 1 << 20, 2 << 20

    async def run():
        coordinator = ShuffleCoordinator(agents, n=2, size_bytes=(low, high), seed=7)
        coordinator.start()
        await asyncio.sleep(1.5)
        await coordinator.stop()
        return coordinator.stats

    stats = asyncio.run(run())
    assert stats.failed == 0
    assert stats.completed >= 2
    assert 2 * low * stats.completed <= stats.bytes_moved <= 2 * high * stats.completed


def test_agent_counts_and_rejects_garbage():
    async def run():
        a, b = ShuffleAgent(), ShuffleAgent()
        pa, pb = await a.start(), await b.start()
        coordinator = ShuffleCoordinator([f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"], n=1)
        moved = await coordinator.shuffle_once(0, 1, 12345)
        reader, writer = await asyncio.open_connection("127.0.0.1", pa)
        writer.write(b"HELLO\n")
        reply = await reader.readline()
        writer.close()
        with pytest.raises(RuntimeError, match="ConnectionRefusedError|OSError"):
            await ShuffleCoordinator([f"127.0.0.1:{pa}", "127.0.0.1:1"], n=1).shuffle_once(0, 1, 10)
        await a.close()
        await b.close()
        return moved, reply, a, b

    moved, reply, a, b = asyncio.run(run())
    assert moved == 2 * 12345
    assert reply == b"ERROR bad request\n"
    assert a.bytes_sent == a.bytes_received == 12345
    assert b.bytes_sent == b.bytes_received == 12345


def test_needs_two_agents():
    with pytest.raises(ValueError, match="two agents"):
        ShuffleCoordinator(["127.0.0.1:1"], n=1)


def test_a_transfer_cut_by_shutdown_ends_without_an_error_in_the_log():
    # When the agent process stops, asyncio.run cancels the handlers of transfers in
    # flight. On Python 3.11 the stream server's done-callback then calls exception()
    # on the cancelled task and the loop logs "Exception in callback ... CancelledError"
    # with a traceback, two per run in every shuffle agent's log. The handler ends
    # quietly instead.
    async def run():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        agent = ShuffleAgent()
        port = await agent.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"DATA 10000000\n" + bytes(1000))
        await writer.drain()
        await asyncio.sleep(0.1)
        handlers = [t for t in asyncio.all_tasks() if "_handle" in repr(t.get_coro())]
        assert len(handlers) == 1
        handlers[0].cancel()
        await asyncio.sleep(0.1)
        writer.close()
        await agent.close()
        return errors, handlers[0]

    errors, handler = asyncio.run(run())
    assert errors == []
    assert handler.done()
