"""``python -m loadgen``: put open-loop load on a frontend and print latency.

Two commands::

    python -m loadgen [--target HOST:PORT] [--rate R] [--num-queries N | --duration-s S] ...
    python -m loadgen serve [--host H] [--port P] [--ready-file F]

The first runs a load generator (``--clients N``: N generator processes,
each a ``python -m loadgen serve`` child driven through the control service
with rate/N and its own client index, records merged; the children are
stopped on exit, Ctrl-C and SIGTERM). The second serves the control service.
"""

import asyncio
import logging
import pathlib
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

from loadgen.client import DEFAULT_TARGET
from services.common import cli
from services.common import tls as tls_mod

PROG = "python -m loadgen"
DEFAULT_CONTROL_PORT = 50071


@dataclass(frozen=True)
class RunConfig:
    target: str
    rate: float
    num_queries: int
    duration_s: float
    warmup_queries: int
    seed: int
    deadline_s: float
    clients: int
    manifest: str
    inputs: str
    out: str
    run_id: str
    progress: bool
    channels: int
    tls: tls_mod.TlsConfig = tls_mod.PLAINTEXT


@dataclass(frozen=True)
class ServeConfig:
    host: str
    port: int
    ready_file: str
    log_level: str
    tls: tls_mod.TlsConfig = tls_mod.PLAINTEXT


POSITIVE = cli.number(above=0)
POSITIVE_INT = cli.number(int, above=0)
NON_NEGATIVE_INT = cli.number(int, at_least=0)


def run_parser():
    p = cli.ArgumentParser(prog=PROG,
                           description="Open-loop Poisson load on a ParM frontend; prints the latency table. "
                                       "`python -m loadgen serve --help` for the control service.")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="frontend host:port (the default is where `make serve` listens)")
    p.add_argument("--rate", type=POSITIVE, default=4.0, help="aggregate queries/s (Poisson)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--num-queries", type=POSITIVE_INT, default=None,
                       help="measured queries (default 100 unless --duration-s)")
    count.add_argument("--duration-s", type=POSITIVE, default=None,
                       help="send measured queries for this long instead of --num-queries")
    p.add_argument("--warmup-queries", type=NON_NEGATIVE_INT, default=10,
                   help="queries sent first and excluded from statistics")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of arrivals and example order")
    p.add_argument("--deadline-s", type=POSITIVE, default=10.0, help="per-query gRPC deadline")
    p.add_argument("--clients", type=POSITIVE_INT, default=1,
                   help="generator processes; the rate and counts are split over them")
    p.add_argument("--manifest", default="",
                   help="base model manifest JSON whose dataset's test split is sent "
                        "(default: the manifest the frontend's GetStatus reports)")
    p.add_argument("--inputs", default="", help=".npz with arrays X, y to send instead of a dataset")
    p.add_argument("--out", default="", help="directory for records.csv and summary.json")
    p.add_argument("--run-id", default="", help="run id (request ids are RUNID-CLIENT-INDEX)")
    p.add_argument("--channels", type=POSITIVE_INT, default=1, help="gRPC channels per generator")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tls_mod.add_arguments(p)
    return p


def serve_parser():
    p = cli.ArgumentParser(prog=f"{PROG} serve",
                           description="Serve the load generator's control service (parm.v1.LoadGenerator).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for remote runners)")
    p.add_argument("--port", type=cli.PORT, default=DEFAULT_CONTROL_PORT, help="0 picks a free port")
    p.add_argument("--ready-file", default="", help="write {port, pid} JSON here once serving")
    p.add_argument("--log-level", default="INFO", help="logging level")
    tls_mod.add_arguments(p)
    return p


def parse_config(argv):
    """``RunConfig`` or ``ServeConfig`` from the command line; raises
    ``cli.UsageError`` (one line) on a mistake."""
    argv = list(argv)
    if argv and argv[0] == "serve":
        a = serve_parser().parse_args(argv[1:])
        return ServeConfig(a.host, a.port, a.ready_file, a.log_level, tls_mod.from_args(a))
    parser = run_parser()
    a = parser.parse_args(argv)
    if a.manifest and a.inputs:
        parser.error("--manifest and --inputs are exclusive")
    manifest = ""
    if a.manifest:
        try:
            manifest = pathlib.Path(a.manifest).read_text()
        except OSError as exc:
            parser.error(f"cannot read --manifest {a.manifest}: {exc.strerror}")
    if a.inputs and not pathlib.Path(a.inputs).is_file():
        parser.error(f"--inputs {a.inputs}: no such file")
    num_queries = a.num_queries if a.num_queries is not None else (0 if a.duration_s else 100)
    if a.clients > 1 and num_queries and num_queries < a.clients:
        parser.error(f"--num-queries {num_queries} is fewer than --clients {a.clients}")
    return RunConfig(
        target=a.target, rate=a.rate, num_queries=num_queries, duration_s=a.duration_s or 0.0,
        warmup_queries=a.warmup_queries, seed=a.seed, deadline_s=a.deadline_s, clients=a.clients,
        manifest=manifest, inputs=str(pathlib.Path(a.inputs).resolve()) if a.inputs else "",
        out=a.out, run_id=a.run_id or time.strftime("run%Y%m%d-%H%M%S"),
        progress=not a.no_progress, channels=a.channels, tls=tls_mod.from_args(a),
    )


def spec_of(cfg):
    from loadgen.runner import Spec
    return Spec(target=cfg.target, rate=cfg.rate, num_queries=cfg.num_queries,
                duration_s=cfg.duration_s, warmup_queries=cfg.warmup_queries, seed=cfg.seed,
                deadline_s=cfg.deadline_s, manifest_json=cfg.manifest, inputs_path=cfg.inputs,
                run_id=cfg.run_id)


class _Bar:
    """A tqdm bar over completed queries (aggregated over generators).

    Created at the first progress report, i.e. once the target answered and
    the inputs loaded, so an early error is not preceded by an empty bar.
    """

    def __init__(self, enabled, total):
        self._enabled = enabled
        self._initial_total = total
        self._bar = None
        self._done = {}
        self._err = {}
        self._total = {}

    def update(self, client, completed, errors, total):
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=self._initial_total or None, unit="q", desc="queries",
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        self._done[client], self._err[client], self._total[client] = completed, errors, total
        done, tot = sum(self._done.values()), sum(self._total.values())
        if tot and self._bar.total != tot:
            self._bar.total = tot
        self._bar.n = done
        self._bar.set_postfix(errors=sum(self._err.values()), refresh=False)
        self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()


async def _run_local(cfg, bar):
    from loadgen.runner import run_async
    return await run_async(spec_of(cfg), channels=cfg.channels,
                           on_progress=lambda c: bar.update(0, c.completed, c.errors, c.total))


async def _run_clients(cfg, bar):
    from loadgen.control import run_remote_async
    from services.common.procs import ServiceProcess
    children = []
    try:
        for i in range(cfg.clients):
            children.append(await asyncio.to_thread(
                ServiceProcess.python_module, "loadgen",
                ["serve", "--port", "0", "--log-level", "WARNING", *cfg.tls.argv()],
                name=f"loadgen-client{i}"))
        result = await run_remote_async(
            [c.address for c in children], spec_of(cfg),
            on_progress=lambda i, p: bar.update(i, p.completed, p.errors, p.total))
        return result
    finally:
        for child in children:
            await asyncio.to_thread(child.stop, 5.0)


async def _main_run(cfg):
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    bar = _Bar(cfg.progress, (cfg.num_queries + cfg.warmup_queries) if cfg.num_queries else 0)
    try:
        if cfg.clients == 1:
            return await _run_local(cfg, bar)
        return await _run_clients(cfg, bar)
    finally:
        bar.close()
        loop.remove_signal_handler(signal.SIGTERM)


def _report(cfg, result, meta):
    from loadgen import stats
    if cfg.out:
        summary = stats.write_run(result.records, cfg.out, meta)
    else:
        summary = stats.summarize(result.records, meta)
    print(stats.format_report(summary))
    if cfg.out:
        print(f"records and summary written to {cfg.out}/")
    return summary


def main_run(cfg):
    """Runs the load; returns the summary. Failures raise ``cli.Failure``;
    SIGTERM, like Ctrl-C, ends in ``KeyboardInterrupt`` once the generators
    have stopped."""
    from loadgen.client import TargetUnavailable
    from loadgen.control import RemoteRunError
    from loadgen.inputs import InputsError
    from services.common.procs import ServiceStartError
    try:
        result = cli.run_async(_main_run(cfg))
    except (TargetUnavailable, InputsError, RemoteRunError, ValueError) as exc:
        raise cli.Failure(str(exc)) from None
    except ServiceStartError as exc:
        raise cli.Failure(f"a generator process did not start: {str(exc).splitlines()[0]}") from None
    except asyncio.CancelledError:  # SIGTERM cancelled the run (see _main_run)
        raise KeyboardInterrupt from None
    meta = dict(getattr(result, "meta", None) or {})
    meta.setdefault("spec", asdict(replace(spec_of(cfg), manifest_json="")))
    meta["clients"] = cfg.clients
    if getattr(result, "per_generator", None):
        meta["generators"] = result.per_generator
    if result.stopped:
        meta["stopped"] = True
    return _report(cfg, result, meta)


async def _serve(cfg):
    from loadgen.control import build_server
    from services.common.procs import write_ready_file
    from services.common.server import run_until_signal
    built = build_server(f"{cfg.host}:{cfg.port}")
    await built.server.start()
    await built.set_serving(True)
    write_ready_file(cfg.ready_file, built.port)
    logging.getLogger("loadgen").info("load generator control service on %s:%d", cfg.host, built.port)
    await run_until_signal(built, grace_s=2.0)


def _port_taken(host, port):
    """Whether ``host:port`` cannot be bound (checked before gRPC tries, so
    the error is one line of ours rather than gRPC's log)."""
    import socket
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return str(exc)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main_serve(cfg):
    """Serves the control service until SIGTERM; failures raise ``cli.Failure``."""
    problem = _port_taken(cfg.host, cfg.port)
    if problem:
        raise cli.Failure(f"cannot serve on {cfg.host}:{cfg.port}: {problem}")
    cli.setup_logging(cfg.log_level)
    try:
        cli.run_async(_serve(cfg))
    except RuntimeError as exc:  # grpc could not bind
        raise cli.Failure(f"cannot serve on {cfg.host}:{cfg.port}: {exc}") from None


def _main(argv):
    cfg = parse_config(argv)
    # every channel (to the frontend, to the generators) and the control server follow the flags
    tls_mod.install(cfg.tls)
    if isinstance(cfg, ServeConfig):
        main_serve(cfg)
    else:
        main_run(cfg)


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)
