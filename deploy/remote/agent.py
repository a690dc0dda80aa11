"""The node agent and the launcher that drives it (remote hosts, AWS runs).

``python -m deploy.remote.agent --host ADDR --port P`` runs on every worker and
client node (started at boot by the node's user data, see ``deploy.aws``).
It serves the ``parm.v1.NodeAgent`` gRPC service: start a project service
process following the ready-file protocol (``--port 0 --ready-file F`` are
appended) and answer with its pid and port; signal, stop, stop all, status.

What it will do is deliberately narrow, because its port is reachable by
every host of the security group:

- it runs ``<python> -m MODULE ARGS`` only for a MODULE on its allowlist
  (default ``services``, ``loadgen``, ``deploy.network.shuffle`` and their
  submodules; ``--allow-module`` adds one, which is how tests add theirs).
  Arguments are passed as argv, never through a shell;
- environment variables a caller may set are limited to ``PARM_*``,
  ``OMP_*``, ``ORT_*`` and ``CUDA_VISIBLE_DEVICES`` (no ``LD_PRELOAD`` or
  ``PYTHONPATH``);
- it signals and stops only processes it started itself;
- it listens only on ``--host`` (127.0.0.1 unless told otherwise; the AWS
  boot script passes the instance's private address, inside a security
  group that admits only the group's own members);
- with ``--tls-cert/--tls-key/--tls-ca --tls-client-auth`` it serves only
  mutual TLS: a caller must present a certificate of the deployment's CA
  (on AWS, a per-deployment CA that reaches the nodes through the bucket;
  the start requests carry the registry password);
- ``--model-server-provider cuda`` (GPU workers) makes every
  ``services.model_server`` it starts run with ``--provider cuda``, which
  fails at start instead of silently running on the CPU.

Ownership: the agent owns its children (``ServiceProcess``); on SIGTERM it
stops serving and then stops every child, newest first.

``AgentLauncher`` is the ``deploy.runner.launcher.Launcher`` over a list of agents:
host i is agent i; ``start`` returns a ``Started`` whose address is host i's
address and the port the process reported.
"""

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from deploy.runner.launcher import Launcher, Started
from services.common import cli
from services.common.errors import InstanceFailed, InvalidInput, NotFound
from services.common.procs import ServiceProcess, ServiceStartError

log = logging.getLogger("deploy.remote.agent")

DEFAULT_ALLOWED_MODULES = ("services", "loadgen", "deploy.network.shuffle")
ENV_ALLOWED = re.compile(r"^(PARM_[A-Z0-9_]*|OMP_[A-Z0-9_]*|ORT_[A-Z0-9_]*|CUDA_VISIBLE_DEVICES)$")
SIGNALS_ALLOWED = frozenset({
    signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGSTOP, signal.SIGCONT,
    signal.SIGUSR1, signal.SIGUSR2,
})
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
SERVICE_NAME = "parm.v1.NodeAgent"
RPC_MARGIN_S = 30.0
MODEL_SERVER = "services.model_server"
PROVIDERS = ("cuda", "cpu")
# The name in the per-deployment node certificate; callers verify it instead of
# the (unknown at issue time) private addresses.
TLS_SERVER_NAME = "parm-node"
TLS_DIR_ENV = "PARM_AGENT_TLS_DIR"


def tls_from_dir(tls_dir):
    """Mutual-TLS ``TlsConfig`` from a deployment's ``ca.pem``/``node.pem``/``node.key``, or None if there is no CA."""
    from services.common.tls import TlsConfig

    if not tls_dir or not os.path.isfile(os.path.join(tls_dir, "ca.pem")):
        return None
    return TlsConfig(cert=os.path.join(tls_dir, "node.pem"), key=os.path.join(tls_dir, "node.key"),
                     ca=os.path.join(tls_dir, "ca.pem"), client_auth=True, server_name=TLS_SERVER_NAME).check()


def with_provider(args, provider):
    """``args`` of a model server with ``--provider`` forced to ``provider`` (None: unchanged)."""
    if not provider:
        return list(args)
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--provider":
            skip = True
            continue
        if a.startswith("--provider="):
            continue
        out.append(a)
    return out + ["--provider", provider]


def module_allowed(module, allowed):
    """True if ``module`` is an allowlist entry or a submodule of one."""
    if not _MODULE_RE.match(module or ""):
        return False
    return any(module == entry or module.startswith(entry + ".") for entry in allowed)


class AgentCore:
    """The processes of one host (no gRPC here; the servicer adapts it).

    Blocking methods (``start``, ``stop``) are called from an executor.
    One lock guards the process table; a start waits for readiness outside it.
    """

    def __init__(self, *, allowed_modules=DEFAULT_ALLOWED_MODULES, log_dir, python=sys.executable,
                 default_ready_timeout_s=120.0, model_server_provider=None):
        self.allowed_modules = tuple(allowed_modules)
        self.model_server_provider = model_server_provider
        self.log_dir = os.path.abspath(log_dir)
        self.python = python
        self.default_ready_timeout_s = default_ready_timeout_s
        self._procs = {}  # pid -> (ServiceProcess, module); insertion order = start order
        self._lock = threading.Lock()
        self._count = 0
        os.makedirs(self.log_dir, exist_ok=True)

    def start(self, module, args, name, env, ready_timeout_s):
        """Starts ``python -m module args --port 0`` -> (pid, port, log_path)."""
        if not module_allowed(module, self.allowed_modules):
            raise InvalidInput(f"module {module!r} is not allowed (allowed: {', '.join(self.allowed_modules)})")
        bad = sorted(k for k in env if not ENV_ALLOWED.match(k))
        if bad:
            raise InvalidInput(f"environment variable(s) not allowed: {', '.join(bad)}")
        if module == MODEL_SERVER:
            args = with_provider(args, self.model_server_provider)
        with self._lock:
            self._count += 1
            seq = self._count
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name or module)[:80]
        log_path = os.path.join(self.log_dir, f"{seq:04d}-{safe}.log")
        timeout_s = ready_timeout_s if ready_timeout_s > 0 else self.default_ready_timeout_s
        try:
            proc = ServiceProcess(
                [self.python, "-m", module, *args, "--port", "0"], name=safe,
                log_path=log_path, env=dict(env), ready_timeout_s=timeout_s,
            )
        except ServiceStartError as exc:
            raise InstanceFailed(str(exc)) from None
        with self._lock:
            self._procs[proc.pid] = (proc, module)
        log.info("started %s (%s) pid %d port %d", safe, module, proc.pid, proc.port)
        return proc.pid, proc.port, log_path

    def _get(self, pid):
        with self._lock:
            entry = self._procs.get(pid)
        if entry is None:
            raise NotFound(f"no process with pid {pid} was started by this agent")
        return entry[0]

    def signal(self, pid, sig):
        if sig not in {int(s) for s in SIGNALS_ALLOWED}:
            raise InvalidInput(f"signal {sig} is not allowed")
        self._get(pid).kill(signal.Signals(sig))

    def stop(self, pid, grace_s):
        return self._get(pid).stop(grace_s=grace_s if grace_s > 0 else 5.0)

    def stop_all(self, grace_s):
        with self._lock:
            procs = [p for p, _ in reversed(list(self._procs.values()))]
        for proc in procs:
            proc.stop(grace_s=grace_s if grace_s > 0 else 5.0)
        return len(procs)

    def status(self):
        with self._lock:
            entries = list(self._procs.values())
        out = []
        for proc, module in entries:
            code = proc.proc.poll()
            out.append({"pid": proc.pid, "name": proc.name, "module": module, "port": proc.port,
                        "alive": code is None, "returncode": code or 0})
        return out


class AgentServicer:
    """Thin gRPC adapter over ``AgentCore`` (blocking work in an executor)."""

    def __init__(self, core):
        self.core = core

    async def StartProcess(self, request, context):
        from parm.v1 import agent_pb2

        pid, port, log_path = await asyncio.to_thread(
            self.core.start, request.module, list(request.args), request.name, dict(request.env),
            request.ready_timeout_s,
        )
        return agent_pb2.AgentStartProcessResponse(pid=pid, port=port, log_path=log_path)

    async def Signal(self, request, context):
        from parm.v1 import agent_pb2

        await asyncio.to_thread(self.core.signal, request.pid, request.signal)
        return agent_pb2.AgentSignalResponse()

    async def Stop(self, request, context):
        from parm.v1 import agent_pb2

        code = await asyncio.to_thread(self.core.stop, request.pid, request.grace_s)
        return agent_pb2.AgentStopResponse(returncode=code or 0)

    async def StopAll(self, request, context):
        from parm.v1 import agent_pb2

        n = await asyncio.to_thread(self.core.stop_all, request.grace_s)
        return agent_pb2.AgentStopAllResponse(stopped=n)

    async def Status(self, request, context):
        from parm.v1 import agent_pb2

        procs = [agent_pb2.AgentProcessInfo(**p) for p in self.core.status()]
        return agent_pb2.AgentStatusResponse(
            hostname=socket.gethostname(), processes=procs, allowed_modules=list(self.core.allowed_modules),
        )


# -- entry point ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentConfig:
    host: str = "127.0.0.1"
    port: int = 0
    ready_file: str | None = None
    log_dir: str = "/tmp/parm-agent"
    allowed_modules: tuple = DEFAULT_ALLOWED_MODULES
    default_ready_timeout_s: float = 120.0
    grace_s: float = 5.0
    log_level: str = "INFO"
    tls: object = None                  # services.common.tls.TlsConfig, or None: plaintext
    model_server_provider: str | None = None


def parse_config(argv):
    from services.common import tls as tls_mod

    p = cli.ArgumentParser(prog="python -m deploy.remote.agent", description=__doc__.split("\n\n")[1])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (only this one)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0 = a free port)")
    p.add_argument("--ready-file", default=None, help="write {port, pid} JSON here once serving")
    p.add_argument("--log-dir", default="/tmp/parm-agent", help="where the children's logs go")
    p.add_argument("--allow-module", action="append", default=[],
                   help="also allow this module and its submodules (repeatable)")
    p.add_argument("--ready-timeout-s", type=float, default=120.0,
                   help="readiness timeout of a started process whose request gives none, s")
    p.add_argument("--grace-s", type=float, default=5.0, help="shutdown grace period, s")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--model-server-provider", choices=PROVIDERS, default=None,
                   help="force --provider on every services.model_server started (GPU nodes: cuda)")
    tls_mod.add_arguments(p)
    args = p.parse_args(argv)
    for mod in args.allow_module:
        if not _MODULE_RE.match(mod):
            raise cli.UsageError(f"--allow-module: {mod!r} is not a dotted module name")
    if not 0 <= args.port < 65536:
        raise cli.UsageError(f"--port: {args.port} is not a port number")
    try:
        tls = tls_mod.from_args(args)
    except tls_mod.TlsError as exc:
        raise cli.UsageError(str(exc)) from None
    return AgentConfig(
        host=args.host, port=args.port, ready_file=args.ready_file, log_dir=args.log_dir,
        allowed_modules=DEFAULT_ALLOWED_MODULES + tuple(args.allow_module),
        default_ready_timeout_s=args.ready_timeout_s, grace_s=args.grace_s, log_level=args.log_level,
        tls=tls if (tls.server_enabled or tls.client_enabled) else None,
        model_server_provider=args.model_server_provider,
    )


def build_server(cfg):
    """Builds (does not start) the agent's server -> (BuiltServer, AgentCore)."""
    from parm.v1 import agent_pb2_grpc
    from services.common.server import create_server

    from services.common.tls import PLAINTEXT

    core = AgentCore(allowed_modules=cfg.allowed_modules, log_dir=cfg.log_dir,
                     default_ready_timeout_s=cfg.default_ready_timeout_s,
                     model_server_provider=cfg.model_server_provider)
    built = create_server(
        f"{cfg.host}:{cfg.port}",
        [(agent_pb2_grpc.add_NodeAgentServicer_to_server, AgentServicer(core), SERVICE_NAME)],
        tls=cfg.tls or PLAINTEXT,
    )
    return built, core


async def serve(cfg):
    from services.common.procs import write_ready_file
    from services.common.server import run_until_signal

    built, core = build_server(cfg)
    await built.server.start()
    await built.set_serving(True)
    write_ready_file(cfg.ready_file, built.port, host=cfg.host)
    log.info("node agent on %s:%d, allowed modules: %s", cfg.host, built.port, ", ".join(cfg.allowed_modules))

    async def on_shutdown():
        await asyncio.to_thread(core.stop_all, cfg.grace_s)

    await run_until_signal(built, grace_s=cfg.grace_s, on_shutdown=on_shutdown)


def _main(argv):
    cfg = parse_config(argv)
    cli.setup_logging(cfg.log_level)
    cli.run_async(serve(cfg))


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m deploy.remote.agent")


# -- the launcher ---------------------------------------------------------------------------

class AgentLauncher(Launcher):
    """Starts service processes through node agents (one agent per host).

    Args:
        agent_addresses: "host:port" of the agent of host i.
        host_addresses: address at which services on host i are reachable;
            default: the host part of the agent's address.
        rpc_timeout_s: timeout of the calls other than ``start`` (whose
            timeout is its ``ready_timeout_s`` plus a margin).
        tls: ``TlsConfig`` to call the agents with (mutual TLS); default:
            ``tls_from_dir($PARM_AGENT_TLS_DIR)``, plaintext when unset.
    """

    def __init__(self, agent_addresses, host_addresses=None, *, rpc_timeout_s=30.0, tls=None):
        import grpc

        from parm.v1 import agent_pb2_grpc
        from services.common.server import grpc_options

        if not agent_addresses:
            raise ValueError("AgentLauncher needs at least one agent address")
        self.agent_addresses = list(agent_addresses)
        if host_addresses is None:
            host_addresses = [a.rsplit(":", 1)[0] for a in self.agent_addresses]
        if len(host_addresses) != len(self.agent_addresses):
            raise ValueError("host_addresses and agent_addresses differ in length")
        self.host_addresses = list(host_addresses)
        self.rpc_timeout_s = rpc_timeout_s
        if tls is None:
            tls = tls_from_dir(os.environ.get(TLS_DIR_ENV, ""))
        if tls is not None and tls.client_enabled:
            creds, options = tls.channel_credentials(), grpc_options() + tls.channel_options()
            self._channels = [grpc.secure_channel(a, creds, options=options) for a in self.agent_addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=grpc_options()) for a in self.agent_addresses]
        self._stubs = [agent_pb2_grpc.NodeAgentStub(c) for c in self._channels]
        self._started = []

    def _call(self, host, method, request, timeout_s=None):
        import grpc

        try:
            return getattr(self._stubs[host], method)(request, timeout=timeout_s or self.rpc_timeout_s)
        except grpc.RpcError as exc:
            raise AgentError(
                f"agent {self.agent_addresses[host]}: {method} failed: {exc.code().name}: {exc.details()}",
                exc.code(),
            ) from None

    def start(self, module, args, *, name, host=0, log_path=None, env=None, ready_timeout_s=60.0):
        """Starts ``module`` on ``host`` through its agent; ``log_path`` stays on the agent's host."""
        from parm.v1 import agent_pb2

        request = agent_pb2.AgentStartProcessRequest(
            module=module, args=[str(a) for a in args], name=name, env=dict(env or {}),
            ready_timeout_s=ready_timeout_s,
        )
        try:
            reply = self._call(host, "StartProcess", request, ready_timeout_s + RPC_MARGIN_S)
        except AgentError as exc:
            raise ServiceStartError(f"{name}: {exc}") from None
        started = Started(name, host, f"{self.host_addresses[host]}:{reply.port}", reply.pid,
                          (host, reply.pid, reply.log_path), self)
        self._started.append(started)
        return started

    def stop_process(self, started, grace_s):
        from parm.v1 import agent_pb2

        host, pid, _ = started._handle
        self._call(host, "Stop", agent_pb2.AgentStopRequest(pid=pid, grace_s=grace_s), grace_s + RPC_MARGIN_S)

    def signal_process(self, started, sig):
        from parm.v1 import agent_pb2

        host, pid, _ = started._handle
        self._call(host, "Signal", agent_pb2.AgentSignalRequest(pid=pid, signal=int(sig)))

    def process_alive(self, started):
        from parm.v1 import agent_pb2

        host, pid, _ = started._handle
        reply = self._call(host, "Status", agent_pb2.AgentStatusRequest())
        return any(p.pid == pid and p.alive for p in reply.processes)

    def status(self, host):
        """The agent's ``AgentStatusResponse`` for ``host`` (raises ``AgentError``)."""
        from parm.v1 import agent_pb2

        return self._call(host, "Status", agent_pb2.AgentStatusRequest())

    def stop_all(self, grace_s=5.0):
        """Stops what this launcher started, newest first; an unreachable agent is logged."""
        while self._started:
            started = self._started.pop()
            try:
                started.stop(grace_s)
            except AgentError as exc:
                log.warning("could not stop %s: %s", started.name, exc)

    def close(self):
        for channel in self._channels:
            channel.close()

    def __exit__(self, *exc):
        try:
            self.stop_all()
        finally:
            self.close()


class AgentError(RuntimeError):
    """A call to a node agent failed; ``code`` is the gRPC status code."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


if __name__ == "__main__":
    sys.exit(main())
