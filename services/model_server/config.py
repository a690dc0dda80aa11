"""Command line -> ``Config`` for ``python -m services.model_server``."""

import os
import socket
import zlib
from dataclasses import dataclass, field

from services.common import cli
from services.common import tls as tls_mod
from services.common.cli import UsageError
from services.common.errors import InvalidInput
from services.common.registry import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, url_with_env_password
from services.common.server import MAX_MESSAGE_BYTES
from services.model_server.distributions import PARAMS, DistSpec, parse_params
from services.model_server.perturbation import PerturbationSpec
from services.model_server.providers import CHOICES as PROVIDER_CHOICES

PROG = "python -m services.model_server"
ROLE_CHOICES = ("data", "parity", "backup")


@dataclass(frozen=True)
class Config:
    model: str
    role: str | None = None  # None: from the manifest (base -> data)
    host: str = "127.0.0.1"
    port: int = 0
    ready_file: str | None = None
    instance_id: str = ""
    advertise_address: str | None = None
    registry_url: str | None = None
    deployment: str = "default"
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    ttl_s: float = DEFAULT_TTL_S
    provider: str = "auto"
    intra_op_threads: int = 1
    executor_workers: int = 1
    compute: DistSpec = field(default_factory=DistSpec)
    seed: int = 0
    perturbation: PerturbationSpec = field(default_factory=PerturbationSpec)
    max_batch: int = 0
    k: int | None = None
    startup_delay_s: float = 0.0
    grace_s: float = 2.0
    log_level: str = "INFO"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    tls: tls_mod.TlsConfig = tls_mod.PLAINTEXT


def build_parser():
    p = cli.ArgumentParser(
        prog=PROG,
        description="Serves one ONNX model (ParM model instance) over gRPC.",
    )
    p.add_argument("--model", required=True, help="manifest .json, or the .onnx with its manifest beside it")
    p.add_argument("--role", choices=ROLE_CHOICES, default=None,
                   help="role to register with (default: from the manifest; base -> data)")
    p.add_argument("--k", type=int, default=None, help="k to register with (default: the manifest's k, else 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=cli.PORT, default=0, help="port to bind (0 = a free port)")
    p.add_argument("--ready-file", default=None, help="write {port, pid, ...} JSON here once serving")
    p.add_argument("--instance-id", default="", help="instance id (default: ROLE-HOSTNAME-PID)")
    p.add_argument("--advertise-address", default=None,
                   help="host:port registered in the registry (default: HOST:PORT bound)")
    p.add_argument("--registry-url", default=None,
                   help="redis:// URL of the registry (default: do not register); its password may come "
                        "from $PARM_REGISTRY_PASSWORD instead")
    p.add_argument("--deployment", default="default", help="registry namespace")
    p.add_argument("--heartbeat-s", type=float, default=DEFAULT_HEARTBEAT_S, help="registry heartbeat period, s")
    p.add_argument("--ttl-s", type=float, default=DEFAULT_TTL_S, help="registry key TTL, s")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                   help="ONNX Runtime provider: auto = CUDA if available, else CPU")
    p.add_argument("--intra-op-threads", type=cli.number(int, at_least=1), default=1,
                   help="ONNX Runtime intra-op threads")
    p.add_argument("--executor-workers", type=cli.number(int, at_least=1), default=1,
                   help="inference executor threads = batches on the (emulated) device at once")
    p.add_argument("--max-batch", type=cli.number(int, at_least=0), default=0, help="largest accepted batch (0 = no limit)")
    p.add_argument("--compute-dist", choices=sorted(PARAMS), default="none",
                   help="emulated compute time added to real inference (distribution kind)")
    p.add_argument("--compute-params", default="", help="its parameters, NAME=VALUE,... (ms; sigma unitless)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of this instance's random draws (default: CRC32 of the instance id)")
    p.add_argument("--delay-dist", choices=sorted(PARAMS), default="none",
                   help="perturbation: extra delay per request (distribution kind)")
    p.add_argument("--delay-params", default="", help="its parameters, NAME=VALUE,...")
    p.add_argument("--stall-probability", type=float, default=0.0, help="perturbation: stall probability")
    p.add_argument("--stall-ms", type=float, default=0.0, help="perturbation: stall length, ms")
    p.add_argument("--fail-probability", type=float, default=0.0,
                   help="perturbation: probability of answering UNAVAILABLE")
    p.add_argument("--hang", action="store_true", help="perturbation: accept requests, never answer")
    p.add_argument("--perturb-duration-s", type=float, default=0.0,
                   help="clear the start-up perturbation after this many s (0 = never)")
    p.add_argument("--startup-delay-s", type=cli.number(at_least=0), default=0.0,
                   help="emulated model load time before the session is created, s")
    p.add_argument("--grace-s", type=cli.number(at_least=0), default=2.0, help="graceful shutdown grace period, s")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--max-message-bytes", type=cli.number(int, at_least=1024), default=MAX_MESSAGE_BYTES,
                   help="gRPC send/receive message limit, bytes (larger: RESOURCE_EXHAUSTED)")
    tls_mod.add_arguments(p)
    return p


def parse_config(argv):
    """Parses ``argv``; raises UsageError (one line) on any mistake."""
    args = build_parser().parse_args(argv)
    tls = tls_mod.from_args(args)
    if not 0 < args.heartbeat_s < args.ttl_s:
        raise UsageError(f"need 0 < --heartbeat-s ({args.heartbeat_s}) < --ttl-s ({args.ttl_s})")
    instance_id = args.instance_id or f"{args.role or 'model'}-{socket.gethostname()}-{os.getpid()}"
    seed = args.seed if args.seed is not None else zlib.crc32(instance_id.encode())
    if seed < 0:
        raise UsageError(f"--seed {seed} must be >= 0")
    try:
        compute = DistSpec.make(args.compute_dist, _params("--compute-params", args.compute_params), seed)
        delay = DistSpec.make(args.delay_dist, _params("--delay-params", args.delay_params), 0)
        perturbation = PerturbationSpec(
            delay=delay, stall_probability=args.stall_probability, stall_ms=args.stall_ms,
            fail_probability=args.fail_probability, hang=args.hang, duration_s=args.perturb_duration_s,
        )
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None
    return Config(
        model=args.model, role=args.role, host=args.host, port=args.port, ready_file=args.ready_file,
        instance_id=instance_id, advertise_address=args.advertise_address,
        registry_url=url_with_env_password(args.registry_url), deployment=args.deployment, heartbeat_s=args.heartbeat_s,
        ttl_s=args.ttl_s, provider=args.provider, intra_op_threads=args.intra_op_threads,
        executor_workers=args.executor_workers, compute=compute, seed=seed, perturbation=perturbation,
        max_batch=args.max_batch, k=args.k, startup_delay_s=args.startup_delay_s, grace_s=args.grace_s,
        log_level=args.log_level, max_message_bytes=args.max_message_bytes, tls=tls,
    )


def _params(flag, text):
    try:
        return parse_params(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
