"""Composition root: ``build_server(cfg, registry=None)`` wires the engine,
servicers, sources, coder, pinned coding buffers, metrics and records;
``serve(cfg)`` runs it until SIGTERM.

Infrastructure at the edge: the frontend receives its registry (a
``services.common.registry`` registry, e.g. ``RedisRegistry``), as the model
server does; ``serve`` builds it from ``--registry-url`` and passes it in, and
the app's ``RegistrySource`` owns it from then on (closed at ``close``).

Build vs run: ``build_server`` binds the port (port 0 picks one; ``app.port``
is the real one) but starts nothing; ``await app.start()`` connects the
instance source, starts the server and marks health SERVING; ``await
app.stop()`` marks NOT_SERVING, stops the server with a grace period, then
closes the engine (pending queries fail, open coding groups are abandoned and
return their buffers), the source, the coder, the coding buffers, the
records and the metrics endpoint, in that order.
"""

import asyncio
import concurrent.futures
import gc
import logging
import pathlib

import numpy as np

from parm.inference import grpc_service_pb2, grpc_service_pb2_grpc
from parm.v1 import frontend_pb2, frontend_pb2_grpc
from services.common import cli
from services.common import manifest as manifest_mod
from services.common import tls as tls_mod
from services.common import tensors
from services.common.procs import write_ready_file
from services.common.server import create_server, run_until_signal
from services.frontend import config as config_mod
from services.common.clock import LoopClock
from services.frontend.coding import CodingPools, LocalCoder, RemoteCoder
from services.frontend.engine import Engine
from services.frontend.instances import GrpcInstanceClient
from services.frontend.kserve import InferenceServicer
from services.frontend.observe import Fanout, Metrics, Records, Stalls
from services.frontend.queues import make_queue_policy
from services.frontend.redundancy import Lateness, make_policy, policy_class
from services.frontend.servicer import FrontendServicer
from services.frontend.sources import RegistrySource, StaticSource

log = logging.getLogger(__name__)

FRONTEND_SERVICE = frontend_pb2.DESCRIPTOR.services_by_name["Frontend"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def zero_output(manifest):
    """The model's output for one all-zero input row (coded mode's padding), run once
    with ONNX Runtime on the CPU; None (padding off, said in the log) if the model
    cannot be run here, e.g. the frontend was given only the manifest."""
    from services.model_server.runner import OnnxRunner

    try:
        runner = OnnxRunner(manifest, ["CPUExecutionProvider"])
        out = runner.run(np.zeros((1, *manifest.input_shape), dtype=np.dtype(manifest.input_dtype)))
    except Exception as exc:  # noqa: BLE001 - any failure only turns padding off
        log.warning("partial coding groups stay uncoded: cannot run %s for its zero output (%s)",
                    manifest.onnx_path, " ".join(str(exc).split())[:300])
        return None
    return np.asarray(out, dtype=np.float32)[0]


class FrontendApp:
    """A built frontend: ``server``, ``port``, ``engine``; ``start``/``stop``.

    Args:
        cfg: ``config.Config``.
        registry: the instance registry (``services.common.registry``), owned
            by the app from now on; required when ``cfg.registry_url`` is set,
            unless ``source`` is given.
        clock, client_factory, source: injected for tests (default: the
            loop's clock, gRPC instance clients, the registry or ``--instances``).
    """

    def __init__(self, cfg, *, registry=None, clock=None, client_factory=None, source=None):
        if source is None and registry is None and cfg.registry_url:
            raise ValueError("the config names a registry (--registry-url) but none was given to the "
                             "frontend (build it at the edge, as serve() does)")
        self.cfg = cfg
        self.base = manifest_mod.load(cfg.model)
        self.parity = manifest_mod.load(cfg.parity_model) if cfg.parity_model else None
        self.backup = manifest_mod.load(cfg.backup_model) if cfg.backup_model else None
        self.clock = clock or LoopClock()
        self.executor = concurrent.futures.ThreadPoolExecutor(cfg.coding_threads, thread_name_prefix="coding")
        self.coder = None
        if cfg.mode == "coded":
            local = LocalCoder(cfg.encoder, executor=self.executor, inline_max_bytes=cfg.inline_coding_max_bytes)
            self.coder = (RemoteCoder(cfg.coder, cfg.encoder, timeout_s=cfg.coder_timeout_ms / 1e3,
                                      fallback=local if cfg.coder_fallback == "local" else None)
                          if cfg.coder else local)
        # Pinned buffers of the coded path (coding.CodingPools): batches are padded to
        # batch_size rows, so one shape per pool. A remote coder's replies are its own.
        self.pools = None
        if cfg.mode == "coded" and not cfg.coder and cfg.coding_pool_buffers > 0:
            out_shape = self.parity.output_shape if self.parity else self.base.output_shape
            self.pools = CodingPools((cfg.batch_size, *self.base.input_shape), (cfg.batch_size, *out_shape),
                                     cfg.coding_pool_buffers)
        self.metrics = Metrics()
        self.records = Records(cfg.records_dir, self.clock) if cfg.records_dir else None
        self.stalls = Stalls(cfg.records_dir) if cfg.records_dir else None
        lateness = Lateness(cfg.decode_policy, quantile=cfg.late_quantile,
                            initial_s=cfg.late_initial_ms / 1e3, window=cfg.late_window,
                            min_samples=min(20, cfg.late_window), margin_s=cfg.late_deadline_margin_ms / 1e3)
        self.zero_output = (zero_output(self.base) if cfg.mode == "coded" and cfg.partial_groups == "pad"
                            else None)
        policy = make_policy(cfg.mode, k=cfg.k, coder=self.coder,
                             hedge_delay_s=None if cfg.hedge_delay_ms is None else cfg.hedge_delay_ms / 1e3,
                             hedge_initial_delay_s=cfg.hedge_initial_delay_ms / 1e3, lateness=lateness,
                             pools=self.pools, zero_output=self.zero_output)
        self.engine = Engine(
            base=self.base, policy=policy, queue=make_queue_policy(cfg.queue_mode), clock=self.clock,
            client_factory=client_factory or GrpcInstanceClient,
            batch_size=cfg.batch_size, batch_timeout_s=cfg.batch_timeout_ms / 1e3,
            group_timeout_s=cfg.group_timeout_ms / 1e3, instance_timeout_s=cfg.instance_timeout_ms / 1e3,
            query_timeout_s=cfg.query_timeout_ms / 1e3, max_in_system=cfg.max_in_system,
            max_in_flight=cfg.max_in_flight, max_coalesce=cfg.max_coalesce, max_attempts=cfg.max_attempts,
            parity_output_shape=self.parity.output_shape if self.parity else None,
            backup_output_shape=self.backup.output_shape if self.backup else None,
            observer=Fanout(self.metrics, self.records))
        self.metrics.attach(self.engine)
        roles = policy_class(cfg.mode).roles
        if source is not None:
            self.source = source
        elif registry is not None:
            self.source = RegistrySource(registry, roles, poll_s=cfg.registry_poll_ms / 1e3)
        else:
            self.source = StaticSource(cfg.instances, roles)
        self.built = create_server(f"{cfg.host}:{cfg.port}", [
            (frontend_pb2_grpc.add_FrontendServicer_to_server,
             FrontendServicer(self.engine, self.status), FRONTEND_SERVICE),
            (grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
             InferenceServicer(self.engine, self.base), INFERENCE_SERVICE),
        ], max_message_bytes=cfg.max_message_bytes, tls=cfg.tls)
        self.server = self.built.server
        self.port = self.built.port
        self.metrics_port = None
        self._flush_handle = None
        self._stopped = False

    def status(self):
        """The ``GetStatusResponse`` (deployment, instances, counters)."""
        e = self.engine
        cfg = self.cfg
        reply = frontend_pb2.GetStatusResponse(
            redundancy_mode=cfg.mode, queue_mode=cfg.queue_mode, k=cfg.k, batch_size=cfg.batch_size,
            model=self.base.name, manifest_path=str(self._manifest_path()),
            encoder=cfg.encoder if cfg.mode == "coded" else "", input_shape=list(self.base.input_shape),
            input_dtype=tensors.dtype_code(self.base.input_dtype), dataset=self.base.dataset,
            manifest_json=self.base.to_json())
        for inst in e.instances.values():
            reply.instances.add(instance_id=inst.instance_id, address=inst.address, role=inst.role,
                                healthy=inst.usable, in_flight=inst.in_flight, completed=inst.completed,
                                errors=inst.errors, model=inst.model)
        for name, value in e.counters.items():
            reply.counters[name] = value
        reply.counters["in_system"] = e.in_system
        # policy gauges in seconds (hedge delay, lateness threshold) as integer microseconds
        for name, value in e.policy.gauges().items():
            reply.counters[name[:-2] + "_us" if name.endswith("_s") else name] = max(0, round(value * 1e6))
        if cfg.mode in ("coded", "cheap"):
            reply.counters["decode_policy_late"] = int(cfg.decode_policy == "late")
        # leak watch (deploy.reliability.soak): unfinished coding groups and live asyncio tasks
        reply.counters["open_groups"] = len(e.groups)
        reply.counters["asyncio_tasks"] = len(asyncio.all_tasks())
        if isinstance(self.coder, RemoteCoder):
            reply.counters["coder_fallbacks"] = self.coder.fallbacks
        if self.pools is not None:
            for kind in ("parity", "reconstruction"):
                reply.counters[f"coding_pool_{kind}_hits"] = self.pools.hits[kind]
                reply.counters[f"coding_pool_{kind}_free"] = self.pools.available(kind)
        for role, depth in e.queue_depths().items():
            reply.counters[f"queue_depth_{role}"] = depth
        return reply

    def _manifest_path(self):
        path = pathlib.Path(self.cfg.model)
        return (path.with_suffix(".json") if path.suffix == ".onnx" else path).resolve()

    async def start(self):
        self.engine.start()
        await self.source.start(self.engine)
        await self.server.start()
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
        if self.records is not None:
            self._schedule_flush()
        # Everything built so far lives as long as the process: move it out of the
        # collector's sight, so that full collections scan only per-query objects.
        gc.collect()
        gc.freeze()
        if self.stalls is not None:
            self.stalls.start()     # after that start-up collection, which is not a stall of serving
        await self.built.set_serving(True)
        write_ready_file(self.cfg.ready_file, self.port, metrics_port=self.metrics_port)
        log.info("frontend serving on port %d (mode %s, queue %s, k %d, batch %d, %d in flight per instance)",
                 self.port, self.cfg.mode, self.cfg.queue_mode, self.cfg.k, self.cfg.batch_size,
                 self.cfg.max_in_flight)

    def _schedule_flush(self):
        self.records.flush()
        self.stalls.flush()
        self._flush_handle = asyncio.get_running_loop().call_later(1.0, self._schedule_flush)

    async def stop(self, grace_s=None):
        if not self._stopped:
            await self.built.set_serving(False)
            await self.server.stop(self.cfg.grace_s if grace_s is None else grace_s)
        await self.close()

    async def close(self):
        if self._stopped:
            return
        self._stopped = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        await self.engine.close()       # abandons open groups: their buffers go back
        await self.source.close()
        if self.coder is not None:
            await self.coder.close()
        if self.pools is not None:
            await self.pools.close()    # after the executor jobs that still write into one
        self.executor.shutdown(wait=False)
        if self.records is not None:
            self.records.close()
            self.stalls.close()
        self.metrics.close()


def build_server(cfg, registry=None, **kwargs):
    """Builds (does not start) a frontend; returns ``FrontendApp`` (``.server``, ``.port``)."""
    return FrontendApp(cfg, registry=registry, **kwargs)


async def serve(cfg):
    """Builds the registry (``--registry-url``) and the app, and serves until SIGTERM."""
    from services.common.registry import build_with_registry

    app = await build_with_registry(cfg.registry_url, cfg.deployment, lambda registry: build_server(cfg, registry))
    try:
        await app.start()
    except BaseException:
        await app.close()
        raise
    await run_until_signal(app.built, grace_s=cfg.grace_s, on_shutdown=app.close)


def _main(argv):
    cfg = config_mod.parse_config(argv)
    cli.setup_logging(cfg.log_level)
    # the instance and coder channels follow the same flags (services.common.tls)
    tls_mod.install(cfg.tls)
    cli.run_async(serve(cfg))


def main(argv=None):
    """``python -m services.frontend``: usage errors exit 2, start-up failures (port in use,
    registry unreachable, bad manifest) exit 1, each as one line."""
    return cli.run_main(_main, argv, prog="python -m services.frontend",
                        runtime_errors=(OSError, RuntimeError, ValueError))
