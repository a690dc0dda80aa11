"""Building and running the model server (``python -m services.model_server``).

``build_server(cfg, registry=None)`` loads the manifest, chooses providers
and builds (does not start) the gRPC server: a ``ModelServerApp`` with
``.server``, ``.port`` and ``.instance``. ``app.run()`` starts it
(health NOT_SERVING), creates the ONNX Runtime session in the executor,
flips health to SERVING, registers with the registry (TTL heartbeat),
writes the ready file, and serves until SIGTERM: health NOT_SERVING ->
``server.stop(grace_s)`` -> deregister -> close the registry.
"""

import asyncio
import logging
import os
import signal

from parm.v1 import model_server_pb2_grpc as pb_grpc
from services.common import cli
from services.common import manifest as manifest_mod
from services.common.procs import write_ready_file
from services.common.registry import Heartbeat, Instance, RegistryError, build_with_registry
from services.common.server import create_server, run_until_signal, setup_logging
from services.model_server.config import PROG, parse_config
from services.model_server.instance import ModelInstance
from services.model_server.providers import ProviderError, select_providers, short_name
from services.model_server.runner import OnnxRunner
from services.model_server.servicer import SERVICE_NAME, ModelServerServicer

log = logging.getLogger("services.model_server")

MANIFEST_ROLES = {"base": "data", "parity": "parity", "backup": "backup"}
STOP_AFTER_S = 0.1


class ModelLoadError(RuntimeError):
    """ONNX Runtime could not create a session for the model (one line, exit 1)."""


def _kill_self():
    """The ``stop`` perturbation: die as if killed (no cleanup, no deregistration)."""
    log.warning("stop perturbation: killing this process")
    os.kill(os.getpid(), signal.SIGKILL)


class ModelServerApp:
    """A built (not yet started) model server and its parts."""

    def __init__(self, cfg, registry=None, *, available_providers=None):
        import onnxruntime as ort

        self.cfg = cfg
        self.registry = registry
        self.manifest = manifest_mod.load(cfg.model)
        self.available_providers = list(available_providers or ort.get_available_providers())
        self.providers = select_providers(cfg.provider, self.available_providers)
        self.role = cfg.role or MANIFEST_ROLES[self.manifest.role]
        self.k = cfg.k if cfg.k is not None else (self.manifest.k or 0)
        self.instance = ModelInstance(
            instance_id=cfg.instance_id, role=self.role, k=self.k, compute=cfg.compute,
            seed=cfg.seed, device_slots=cfg.executor_workers, on_stop=self._schedule_stop,
        )
        self.info = {
            "model_name": self.manifest.name,
            "manifest_json": self.manifest.to_json(),
            "available_providers": self.available_providers,
        }
        self.servicer = ModelServerServicer(self.instance, self.info)
        self.built = create_server(
            f"{cfg.host}:{cfg.port}",
            [(pb_grpc.add_ModelServerServicer_to_server, self.servicer, SERVICE_NAME)],
            max_message_bytes=cfg.max_message_bytes, tls=cfg.tls,
        )
        self.server = self.built.server
        self.port = self.built.port
        self.address = cfg.advertise_address or f"{cfg.host}:{self.port}"
        self.heartbeat = None

    def _schedule_stop(self):
        asyncio.get_running_loop().call_later(STOP_AFTER_S, _kill_self)

    def _make_runner(self):
        return OnnxRunner(self.manifest, self.providers, intra_op_threads=self.cfg.intra_op_threads,
                          max_batch=self.cfg.max_batch, strict=self.cfg.provider == "cuda")

    async def start(self):
        """Starts serving RPCs (health NOT_SERVING; Infer answers UNAVAILABLE until loaded)."""
        await self.server.start()
        await self.built.set_serving(False)
        if not self.cfg.perturbation.is_clear:
            self.instance.perturbations.set(self.cfg.perturbation)

    async def load(self):
        """Creates the session (after ``startup_delay_s``), then health SERVING."""
        if self.cfg.startup_delay_s:
            await asyncio.sleep(self.cfg.startup_delay_s)
        try:
            runner = await self.instance.load(self._make_runner)
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors share no base but Exception
            raise ModelLoadError(f"cannot load {self.manifest.onnx_path}: {type(exc).__name__}: {exc}") from exc
        self.info["provider"] = runner.provider
        log.info("session loaded: %s with providers %s (in use: %s)", self.manifest.onnx_path,
                 runner.providers, runner.provider)
        await self.built.set_serving(True)
        return runner

    async def register(self):
        if self.registry is None:
            return
        inst = Instance(self.cfg.instance_id, self.address, self.role, self.manifest.name, self.k,
                        meta={"provider": short_name(self.info["provider"]), "pid": os.getpid()})
        self.heartbeat = Heartbeat(self.registry, inst, heartbeat_s=self.cfg.heartbeat_s, ttl_s=self.cfg.ttl_s)
        await self.heartbeat.start()

    async def shutdown(self):
        """Deregisters and releases resources (the server is already stopped)."""
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        if self.registry is not None:
            await self.registry.close()
        self.instance.close()

    async def run(self):
        try:
            await self.start()
            runner = await self.load()
            await self.register()
        except BaseException:
            await self.server.stop(0)
            await self.shutdown()
            raise
        cfg = self.cfg
        print(
            f"model_server {cfg.instance_id}: {self.manifest.name} ({self.role}, k={self.k}) on "
            f"{self.address} provider={runner.provider} compute={cfg.compute.describe()} "
            f"perturbation={self.instance.perturbations.current.describe()} "
            f"registry={cfg.deployment if self.registry else 'none'}",
            flush=True,
        )
        write_ready_file(cfg.ready_file, self.port, instance_id=cfg.instance_id, provider=runner.provider,
                         role=self.role, address=self.address)
        await run_until_signal(self.built, grace_s=cfg.grace_s, on_shutdown=self.shutdown)


def build_server(cfg, registry=None):
    """Builds the server (see module docstring); returns a ModelServerApp."""
    return ModelServerApp(cfg, registry)


async def serve(cfg):
    app = await build_with_registry(cfg.registry_url, cfg.deployment, lambda registry: build_server(cfg, registry))
    await app.run()


def _main(argv):
    cfg = parse_config(argv)
    setup_logging(cfg.log_level)
    cli.run_async(serve(cfg))


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=(
        manifest_mod.ManifestError, ModelLoadError, ProviderError, RegistryError, OSError))
