"""One deployment for one run: registry, model instances, frontend.

``start_deployment(spec, launcher, placement, artifacts, ...)`` starts, in
order, the registry (an embedded Redis-compatible server, on the frontend's
host), the model instances of the run's redundancy mode (DESIGN section 4:
N data instances plus N/k parity, backup or extra data instances, each its
own process on its own port, placed round-robin over the worker hosts), and
the frontend, then waits until the frontend reports every instance healthy.

Ownership: every process is started through the ``Launcher``, which owns it;
``Deployment.stop()`` stops the frontend first (so it flushes its records),
then the instances, then the registry. If any start fails, everything
started so far is stopped before the error propagates, so a failed run
leaves nothing behind.
"""

import asyncio
import json
import logging
import pathlib
import secrets
import subprocess
import sys
from dataclasses import dataclass, field

from services.common.registry import PASSWORD_ENV, split_password

log = logging.getLogger(__name__)


class DeploymentError(RuntimeError):
    """A deployment could not be started (the message says which part)."""


@dataclass(frozen=True)
class Placement:
    """Which launcher host runs what."""

    frontend: int = 0
    workers: tuple = (0,)
    clients: tuple = (0,)

    def worker(self, i):
        return self.workers[i % len(self.workers)]

    def client(self, i):
        return self.clients[i % len(self.clients)]


@dataclass(frozen=True)
class Models:
    """Manifest paths of the models a run needs."""

    base: str
    parity: str | None = None
    backup: str | None = None


def ensure_models(artifacts, sweep, *, build=True):
    """Resolves every run's manifests; trains the default set (``models.build``) if missing and ``build``."""
    def check():
        for run in sweep.runs():
            resolve_models(artifacts, sweep.model, run.redundancy_mode, run.k, run.encoder)
    try:
        check()
        return
    except DeploymentError:
        if not build:
            raise
    print(f"building the default models into {artifacts}/ (python -m models.build) ...", flush=True)
    rc = subprocess.call([sys.executable, "-m", "models.build", "--out", str(artifacts)])
    if rc != 0:
        raise DeploymentError(f"python -m models.build failed with exit code {rc}")
    check()


def resolve_models(artifacts, model, mode, k, encoder):
    """Finds the manifests for a run; ``DeploymentError`` naming what is missing.

    ``model`` is ``"default"`` (the base model of the default artifact set,
    as ``models.build`` recorded it in ``index.json``), an artifact name
    (``mnist-lenet5-wide``) or an architecture name (``resnet18``) matched
    against ``*-<arch>.json``.
    """
    root = pathlib.Path(artifacts)
    if model == "default":
        try:
            index = json.loads((root / "index.json").read_text())
            model = next(a["name"] for a in index["artifacts"] if a["role"] == "base")
        except (OSError, ValueError, KeyError, StopIteration):
            raise DeploymentError(
                f"no default model set in {root}/ (index.json missing or without a base model); "
                "build it with `make models`"
            ) from None
    base = root / f"{model}.json"
    if not base.exists():
        matches = sorted(p for p in root.glob(f"*-{model}.json"))
        if len(matches) != 1:
            raise DeploymentError(
                f"no base model {model!r} in {root}/ (looked for {model}.json and *-{model}.json); "
                "build the default models with `make models`, or train one with `python -m models.train base`"
            )
        base = matches[0]
    name = base.stem
    parity = backup = None
    if mode == "coded":
        parity = root / f"{name}-parity-k{k}-{encoder}.json"
        if not parity.exists():
            raise DeploymentError(
                f"no parity model for k={k}, encoder {encoder} in {root}/ ({parity.name}); train it with "
                f"`python -m models.train parity --k {k} --encoder {encoder}` or `make models`"
            )
    if mode == "cheap":
        backup = root / f"{name}-backup.json"
        if not backup.exists():
            raise DeploymentError(
                f"no backup model in {root}/ ({backup.name}); train it with `python -m models.train backup` "
                "or `make models`"
            )
    return Models(str(base), parity and str(parity), backup and str(backup))


def distribution_args(prefix, dist, seed=None):
    """``--<prefix>-dist KIND --<prefix>-params a=1,b=2`` for a model server."""
    params = ",".join(f"{k}={v:g}" for k, v in sorted(dist.get("params", {}).items()))
    args = [f"--{prefix}-dist", dist["kind"]]
    if params:
        args += [f"--{prefix}-params", params]
    if seed is not None:
        args += ["--seed", str(seed)]
    return args


def instance_id(role, index):
    """The id of a deployment's ``index``-th instance (counted over all roles)."""
    return f"{role}-{index}"


@dataclass
class Deployment:
    spec: object
    launcher: object
    placement: Placement
    registry: object = None
    registry_url: str = field(default="", repr=False)  # holds the password
    namespace: str = ""
    instances: list = field(default_factory=list)  # (role, Started)
    frontend: object = None
    records_dir: str = ""

    @property
    def frontend_address(self):
        return self.frontend.address

    def instance_addresses(self, roles=("data", "parity", "backup")):
        return [s.address for role, s in self.instances if role in roles]

    def instance_ids(self):
        """The instances' ids (as the frontend's records name them), in ``instances`` order."""
        return [instance_id(role, i) for i, (role, _) in enumerate(self.instances)]

    def stop(self, grace_s=5.0):
        """Frontend first (it flushes its records), then instances, then the registry."""
        for started in [self.frontend] + [s for _, s in reversed(self.instances)] + [self.registry]:
            if started is not None:
                try:
                    started.stop(grace_s)
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    log.warning("stopping %s: %s", started.name, exc)


def frontend_args(spec, models, registry_url, namespace, records_dir, metrics_port, host):
    """The frontend's command-line arguments for a run (the registry URL without its password)."""
    args = [
        "--mode", spec.redundancy_mode,
        "--queue-mode", spec.queue_mode,
        "--k", str(spec.k),
        "--batch-size", str(spec.batch_size),
        "--batch-timeout-ms", f"{spec.batch_timeout_ms:g}",
        "--model", models.base,
        "--registry-url", registry_url,
        "--deployment", namespace,
        "--records-dir", str(records_dir),
        "--metrics-port", str(metrics_port),
        "--host", host,
    ]
    if models.parity:
        args += ["--parity-model", models.parity]
    if models.backup:
        args += ["--backup-model", models.backup]
    if getattr(spec, "decode_policy", None):
        # Only when the config sets it, so a config without it runs on any frontend.
        args += ["--decode-policy", spec.decode_policy]
    if getattr(spec, "partial_groups", None):
        args += ["--partial-groups", spec.partial_groups]
    if getattr(spec, "max_in_flight", None):
        args += ["--max-in-flight", str(spec.max_in_flight)]
    return args


def start_deployment(spec, launcher, placement, models, *, namespace, log_dir, records_dir,
                     seed=0, registry_url=None, ready_timeout_s=90.0, metrics_port=0,
                     frontend_port=0, frontend_extra_args=(), server_extra_args=(), tls=None):
    """Starts registry, instances and frontend for ``spec``; see the module doc.

    ``tls``: a ``services.common.tls.TlsConfig`` given to the frontend and
    every instance (and used for the readiness probe); None = plaintext.
    """
    tls_args = tls.argv() if tls is not None else []
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(spec, launcher, placement, namespace=namespace, records_dir=str(records_dir))
    try:
        if registry_url is None:
            # A fresh password per deployment: the registry answers only
            # clients that AUTH (and Valkey refuses non-loopback clients of
            # a server without one).
            password = secrets.token_hex(16)
            dep.registry = launcher.start(
                "services.common.registry",
                ["serve", "--host", launcher.bind_address(placement.frontend)],
                name=f"{namespace}-registry", host=placement.frontend, log_path=log_dir / "registry.log",
                env={PASSWORD_ENV: password},
            )
            registry_url = f"redis://:{password}@{dep.registry.address}/0"
        dep.registry_url = registry_url
        # The password goes in the environment, not on command lines (``ps``).
        public_url, registry_password = split_password(registry_url)
        secret_env = {PASSWORD_ENV: registry_password} if registry_password else None
        data, parity, backup = spec.num_instances
        roles = [("data", models.base)] * data + [("parity", models.parity)] * parity + \
                [("backup", models.backup)] * backup
        for i, (role, manifest) in enumerate(roles):
            host = placement.worker(i)
            args = [
                "--model", manifest, "--role", role,
                "--host", launcher.bind_address(host),
                "--instance-id", instance_id(role, i),
                "--registry-url", public_url, "--deployment", namespace,
                *distribution_args("compute", spec.compute, seed=seed * 1000 + i),
                *server_extra_args, *tls_args,
            ]
            started = launcher.start("services.model_server", args, name=f"{namespace}-{role}-{i}",
                                     host=host, log_path=log_dir / f"{role}-{i}.log", env=secret_env)
            dep.instances.append((role, started))
        dep.frontend = launcher.start(
            "services.frontend",
            frontend_args(spec, models, public_url, namespace, records_dir, metrics_port,
                           launcher.bind_address(placement.frontend))
            + list(frontend_extra_args) + tls_args,
            name=f"{namespace}-frontend", host=placement.frontend, log_path=log_dir / "frontend.log",
            env=secret_env,
            **({"port": frontend_port} if frontend_port else {}),
        )
        asyncio.run(wait_healthy(dep.frontend.address, len(roles), ready_timeout_s, tls=tls))
    except BaseException:
        dep.stop(grace_s=2)
        raise
    return dep


async def wait_healthy(frontend_address, expected, timeout_s, tls=None):
    """Polls ``GetStatus`` until ``expected`` instances are healthy.

    Only "not up yet" is retried (``services.common.polls``); a TLS or
    protocol mismatch fails at once with its real error.
    """
    import grpc

    from parm.v1 import frontend_pb2, frontend_pb2_grpc
    from services.common.polls import PollTimeout, describe, poll_until
    from services.common.server import open_channel

    seen = 0
    async with open_channel(frontend_address, tls=tls) as channel:
        stub = frontend_pb2_grpc.FrontendStub(channel)

        async def probe():
            nonlocal seen
            status = await stub.GetStatus(frontend_pb2.GetStatusRequest(), timeout=2.0)
            seen = sum(1 for inst in status.instances if inst.healthy)
            return status if seen >= expected else None

        try:
            return await poll_until(probe, timeout_s, what=f"frontend {frontend_address}")
        except PollTimeout as exc:
            last = f" (last answer {describe(exc.last_error)})" if exc.last_error is not None else ""
            raise DeploymentError(f"frontend {frontend_address} saw {seen} of {expected} instances healthy "
                                  f"after {timeout_s:.0f} s{last}") from None
        except grpc.aio.AioRpcError as exc:
            raise DeploymentError(f"frontend {frontend_address}: {describe(exc)}") from None


def describe(dep):
    return json.dumps({
        "frontend": dep.frontend.address,
        "registry": dep.registry.address if dep.registry is not None else "(external)",
        "instances": [{"role": r, "address": s.address} for r, s in dep.instances],
    }, indent=2)
