"""Real background shuffles: bulk TCP transfers between instance hosts.

One *agent* runs on every instance host (``python -m deploy.network.shuffle agent``).
An agent listens on one TCP port and speaks a line protocol:

- ``SHUFFLE <peer_host:port> <nbytes>\\n`` (from a coordinator): the agent
  connects to the peer agent, sends ``DATA <nbytes>\\n`` and then ``nbytes``
  bytes, reads ``nbytes`` bytes echoed back, and answers the coordinator
  ``DONE <bytes_moved> <seconds>\\n`` (bytes moved = 2 x nbytes, there and
  back), or ``ERROR <reason>\\n``.
- ``DATA <nbytes>\\n`` (from a peer agent): the agent reads ``nbytes`` bytes
  and sends as many back.
- ``PROBE\\n`` (from ``deploy.network.calibrate``): the connection becomes a
  probe channel; each ``P <id> <nbytes> <reply_bytes>\\n`` followed by
  ``nbytes`` bytes is answered ``R <id>\\n`` followed by ``reply_bytes`` bytes,
  in order, on the same connection (like gRPC's one connection per peer, a
  lost segment delays every probe behind it).

The *coordinator* (``ShuffleCoordinator``) keeps ``n`` shuffles in flight, in
a loop: each picks a random ordered pair of distinct agents and a random size
in ``[low, high]`` bytes (seeded), asks the first agent to shuffle with the
second, and starts the next when it finishes — the original's background
traffic (n concurrent shuffles of 128-256 MB between random workers). Its
``timeline`` keeps every completed transfer (start, end, the two agents).

Invariants: a transfer's buffer is one preallocated chunk per agent, sent
repeatedly (never the size of the transfer); every connection is closed when
its transfer ends or fails; ``stop()`` cancels the loops and waits for them,
so no task outlives the coordinator. Bytes are counted only for transfers
that completed both directions.
"""

import asyncio
import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass

from services.common import cli
from services.common.clock import REAL as REAL_CLOCK
from services.common.procs import write_ready_file

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_CHUNK = memoryview(bytes(CHUNK_BYTES))


async def _send_bytes(writer, nbytes):
    left = nbytes
    while left > 0:
        n = min(left, CHUNK_BYTES)
        writer.write(_CHUNK[:n])
        await writer.drain()
        left -= n


async def _recv_bytes(reader, nbytes):
    left = nbytes
    while left > 0:
        data = await reader.read(min(left, CHUNK_BYTES))
        if not data:
            raise ConnectionError(f"peer closed with {left} bytes outstanding")
        left -= len(data)


class ShuffleAgent:
    """The per-host agent: answers SHUFFLE (as sender) and DATA (as echo)."""

    def __init__(self, host="127.0.0.1", port=0):
        self.host, self.port = host, port
        self._server = None
        self.bytes_sent = 0
        self.bytes_received = 0

    async def start(self):
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self):
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader, writer):
        try:
            line = (await reader.readline()).decode().split()
            if len(line) == 2 and line[0] == "DATA" and line[1].isdigit():
                nbytes = int(line[1])
                await _recv_bytes(reader, nbytes)
                self.bytes_received += nbytes
                await _send_bytes(writer, nbytes)
                self.bytes_sent += nbytes
            elif line == ["PROBE"]:
                await self._probe(reader, writer)
            elif len(line) == 3 and line[0] == "SHUFFLE" and line[2].isdigit():
                try:
                    moved, seconds = await self._shuffle(line[1], int(line[2]))
                    writer.write(f"DONE {moved} {seconds:.6f}\n".encode())
                except (OSError, ConnectionError, ValueError) as exc:
                    writer.write(f"ERROR {type(exc).__name__}: {exc}\n".encode())
                await writer.drain()
            else:
                writer.write(b"ERROR bad request\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The agent is stopping (asyncio.run cancels the transfers in flight), and
            # nothing waits for this handler. Ending it normally instead of cancelled:
            # on Python 3.11 the stream server's done-callback calls exception() on a
            # cancelled handler, and the loop logs that CancelledError with a traceback.
            return
        finally:
            writer.close()

    async def _probe(self, reader, writer):
        while True:
            line = (await reader.readline()).decode().split()
            if not line:
                return
            if len(line) != 4 or line[0] != "P" or not all(x.isdigit() for x in line[1:]):
                writer.write(b"ERROR bad probe\n")
                await writer.drain()
                return
            nbytes, reply = int(line[2]), int(line[3])
            if nbytes > CHUNK_BYTES or reply > CHUNK_BYTES:
                writer.write(b"ERROR probe too large\n")
                await writer.drain()
                return
            await reader.readexactly(nbytes)
            writer.write(f"R {line[1]}\n".encode())
            writer.write(_CHUNK[:reply])
            await writer.drain()

    async def _shuffle(self, peer, nbytes):
        host, _, port = peer.rpartition(":")
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"DATA {nbytes}\n".encode())
            # Send and receive concurrently: the echo starts once the peer
            # has read everything, but the socket buffers must keep draining.
            send = asyncio.ensure_future(_send_bytes(writer, nbytes))
            try:
                await _recv_bytes(reader, nbytes)
            finally:
                await send
            self.bytes_sent += nbytes
            self.bytes_received += nbytes
        finally:
            writer.close()
        return 2 * nbytes, time.perf_counter() - start


@dataclass
class ShuffleStats:
    completed: int = 0
    failed: int = 0
    bytes_moved: int = 0


@dataclass(frozen=True)
class TransferSpan:
    """One completed shuffle: agents ``src`` -> ``dst`` and back, monotonic times."""

    src: int
    dst: int
    nbytes: int
    start_s: float
    end_s: float


class ShuffleCoordinator:
    """Keeps ``n`` shuffles between random agent pairs in flight, in a loop."""

    def __init__(self, agents, n, size_bytes=(128 << 20, 256 << 20), seed=0, timeout_s=600.0,
                 clock=None):
        if len(agents) < 2 and n > 0:
            raise ValueError("background shuffles need at least two agents")
        self.agents = list(agents)
        self.n = n
        self.size_bytes = size_bytes
        self.timeout_s = timeout_s
        self._rng = random.Random(seed)
        self._tasks = []
        self._stopping = False
        self.stats = ShuffleStats()
        self.timeline = []
        self._clock = (clock or REAL_CLOCK).now  # a services.common.clock.Clock

    def start(self):
        self._stopping = False
        self._tasks = [asyncio.ensure_future(self._loop()) for _ in range(self.n)]

    async def stop(self):
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self):
        # wait_for (asyncio.timeout is 3.11+, and this runs on AWS nodes' 3.10):
        # wait_for can swallow a cancellation that arrives as the transfer
        # completes, so the loop checks the flag, which makes stop() final.
        while not self._stopping:
            src, dst = self._rng.sample(range(len(self.agents)), 2)
            nbytes = self._rng.randint(*self.size_bytes)
            try:
                start = self._clock()
                moved = await asyncio.wait_for(self.shuffle_once(src, dst, nbytes), self.timeout_s)
                self.timeline.append(TransferSpan(src, dst, nbytes, start, self._clock()))
                self.stats.completed += 1
                self.stats.bytes_moved += moved
            except (OSError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
                self.stats.failed += 1
                log.warning("shuffle %s -> %s failed: %s", self.agents[src], self.agents[dst], exc)
                await asyncio.sleep(0.5)

    async def shuffle_once(self, src, dst, nbytes):
        """One transfer from agent ``src`` to ``dst`` and back; bytes moved."""
        host, _, port = self.agents[src].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"SHUFFLE {self.agents[dst]} {nbytes}\n".encode())
            await writer.drain()
            reply = (await reader.readline()).decode().split()
        finally:
            writer.close()
        if len(reply) == 3 and reply[0] == "DONE":
            return int(reply[1])
        raise RuntimeError(" ".join(reply) or "agent closed the connection")


def parse_config(argv):
    parser = cli.ArgumentParser(
        prog="python -m deploy.network.shuffle",
        description="Background-traffic shuffle agent (one per instance host).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    agent = sub.add_parser("agent", help="run an agent")
    agent.add_argument("--host", default="127.0.0.1", help="address to listen on")
    agent.add_argument("--port", type=int, default=0, help="TCP port, 0 = any free port")
    agent.add_argument("--ready-file", default="", help="write {port, pid} JSON here once listening")
    return parser.parse_args(argv)


async def _serve_agent(cfg):
    import signal

    agent = ShuffleAgent(cfg.host, cfg.port)
    port = await agent.start()
    write_ready_file(cfg.ready_file, port)
    log.info("shuffle agent on %s:%d", cfg.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Transfers in flight are abandoned (asyncio.run cancels their handlers);
    # waiting for them could outlast the caller's grace period.
    with contextlib.suppress(asyncio.TimeoutError):  # not the builtin: on 3.10 they differ
        await asyncio.wait_for(agent.close(), 1.0)


def _main(argv):
    cfg = parse_config(argv)
    cli.setup_logging("INFO")
    try:
        cli.run_async(_serve_agent(cfg))
    except OSError as exc:
        raise cli.Failure(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m deploy.network.shuffle")


if __name__ == "__main__":
    sys.exit(main())
