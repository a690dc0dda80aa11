"""The shared rig of the reliability benchmarks (chaos, fuzz, overload, soak).

``start_rig`` starts a local deployment of one ``run_spec`` (registry,
instances, frontend, optionally a coder service) through a ``LocalLauncher``
and returns a ``Rig``: what a benchmark needs to reach, fault and restart
its parts. The caller owns the rig and must call ``Rig.stop`` (in a
``finally``); ``start_rig`` stops what it started if the start fails.
"""

import pathlib
import time
from dataclasses import dataclass, field

from services.common.registry import PASSWORD_ENV, split_password


def run_spec(*, mode="coded", num_models=2, k=2, compute_ms=5.0, batch_size=1, encoder="sum",
             deadline_s=5.0, queue_mode="single_queue"):
    """A ``deploy.runner.config.RunSpec`` for a local benchmark deployment."""
    from deploy.runner import config as config_mod

    return config_mod.RunSpec(
        experiment_id="chaos", model="default", redundancy_mode=mode, queue_mode=queue_mode,
        num_models=num_models, k=k, batch_size=batch_size, num_clients=1, send_rate=1.0,
        background=0, num_queries=0, trial=0, warmup_queries=0, seed=0, encoder=encoder,
        deadline_s=deadline_s, batch_timeout_ms=5.0, network="emulated",
        compute={"kind": "constant", "params": {"value_ms": compute_ms}} if compute_ms else {"kind": "none"},
        background_model={}, clipper={})


@dataclass
class Rig:
    """A started local deployment and what is needed to restart parts of it."""

    launcher: object
    dep: object
    models: object
    log_dir: pathlib.Path
    frontend_args: list = field(default_factory=list)
    coder: object = None
    tls: object = None

    def instance(self, role, index=0):
        return [s for r, s in self.dep.instances if r == role][index]

    def stop(self):
        self.dep.stop(grace_s=2)
        self.launcher.stop_all(grace_s=2)


def start_rig(artifacts, spec, work_dir, *, with_coder=False, frontend_extra_args=(), tls=None,
              server_extra_args=()):
    """Starts a deployment of ``spec`` (and a coder service) on this machine."""
    from deploy.runner import deployment
    from deploy.runner.launcher import LocalLauncher

    work_dir = pathlib.Path(work_dir)
    models = deployment.resolve_models(artifacts, "default", spec.redundancy_mode, spec.k, spec.encoder)
    launcher = LocalLauncher()
    extra = list(frontend_extra_args)
    coder = None
    try:
        if with_coder:
            coder = launcher.start("services.coder", (tls.argv() if tls else []), name="chaos-coder",
                                   log_path=work_dir / "logs" / "coder.log")
            extra += ["--coder", coder.address]
        dep = deployment.start_deployment(
            spec, launcher, deployment.Placement(), models, namespace=f"chaos{int(time.time() * 1e3) % 10**8}",
            log_dir=work_dir / "logs", records_dir=work_dir / "frontend", frontend_extra_args=extra,
            server_extra_args=server_extra_args, tls=tls)
    except BaseException:
        launcher.stop_all(grace_s=1)
        raise
    args = deployment.frontend_args(spec, models, split_password(dep.registry_url)[0], dep.namespace,
                                     dep.records_dir, 0,
                                     launcher.bind_address(0)) + extra + (tls.argv() if tls else [])
    return Rig(launcher, dep, models, work_dir / "logs", args, coder, tls)


def add_rig_arguments(parser, *, num_models, compute_ms, deadline_s, out):
    """The flags every benchmark's deployment takes, with that benchmark's defaults:
    ``--artifacts``, ``--num-models``, ``--compute-ms``, ``--deadline-s``, ``--out``."""
    parser.add_argument("--artifacts", default="artifacts", help="model artifacts (make models)")
    parser.add_argument("--num-models", type=int, default=num_models, help="data instances")
    parser.add_argument("--compute-ms", type=float, default=compute_ms, help="emulated compute per batch, ms")
    parser.add_argument("--deadline-s", type=float, default=deadline_s, help="per-query deadline, s")
    parser.add_argument("--out", default=out, help="logs and the JSON result go here")


def rig_errors():
    """The runtime failures of starting a rig (one line, exit 1 in the benchmarks' CLIs)."""
    from deploy.runner.deployment import DeploymentError
    from services.common.procs import ServiceStartError

    return (OSError, DeploymentError, ServiceStartError)


def missing_models(artifacts):
    """A ``cli.Failure`` message when ``artifacts`` holds no models, else None."""
    if not pathlib.Path(artifacts, "index.json").exists():
        return f"no models in {artifacts}/; build them with `make models`"
    return None


def secret_env(rig):
    """The environment that passes the registry password to a restarted service, or None."""
    password = split_password(rig.dep.registry_url)[1]
    return {PASSWORD_ENV: password} if password else None


async def set_hang(address, hang, timeout_s=5.0):
    """``SetPerturbation(hang=...)`` on a model server."""
    from parm.v1 import model_server_pb2 as pb
    from parm.v1 import model_server_pb2_grpc as pb_grpc
    from services.common.server import open_channel

    async with open_channel(address) as ch:
        await pb_grpc.ModelServerStub(ch).SetPerturbation(
            pb.SetPerturbationRequest(perturbation=pb.Perturbation(hang=hang)), timeout=timeout_s)


async def frontend_status(address, timeout_s=2.0):
    from parm.v1 import frontend_pb2, frontend_pb2_grpc
    from services.common.server import open_channel

    async with open_channel(address) as ch:
        return await frontend_pb2_grpc.FrontendStub(ch).GetStatus(frontend_pb2.GetStatusRequest(),
                                                                   timeout=timeout_s)
