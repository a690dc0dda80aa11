"""Configuration of ``python -m services.frontend``: flags -> frozen ``Config``.

``parse_config(argv)`` raises ``services.common.cli.UsageError`` (one line;
exit 2 through ``cli.run_main``) for any bad flag or mismatched model.
"""

from dataclasses import dataclass

from services.common import cli
from services.common import manifest as manifest_mod
from services.common import tls as tls_mod
from services.common.registry import url_with_env_password
from services.common.server import MAX_MESSAGE_BYTES
from services.frontend.redundancy import DECODE_POLICIES, MODES
from services.frontend.instances import parse_static_instances


DEFAULT_CODING_POOL_BUFFERS = 32


@dataclass(frozen=True)
class Config:
    mode: str
    queue_mode: str
    k: int
    batch_size: int
    batch_timeout_ms: float
    group_timeout_ms: float
    instance_timeout_ms: float
    query_timeout_ms: float
    model: str
    parity_model: str | None
    backup_model: str | None
    encoder: str
    instances: tuple
    registry_url: str | None
    deployment: str
    registry_poll_ms: float
    coder: str | None
    coder_timeout_ms: float
    inline_coding_max_bytes: int
    coding_threads: int
    max_in_system: int
    max_in_flight: int
    max_coalesce: int
    max_attempts: int
    hedge_delay_ms: float | None
    hedge_initial_delay_ms: float
    host: str
    port: int
    ready_file: str | None
    metrics_port: int | None
    records_dir: str | None
    grace_s: float
    log_level: str
    max_message_bytes: int = MAX_MESSAGE_BYTES
    coder_fallback: str = "local"
    tls: tls_mod.TlsConfig = tls_mod.PLAINTEXT
    decode_policy: str = "late"
    late_quantile: float = 0.95
    late_initial_ms: float = 50.0
    late_window: int = 1000
    late_deadline_margin_ms: float = 2.0
    coding_pool_buffers: int = DEFAULT_CODING_POOL_BUFFERS
    partial_groups: str = "pad"


def build_parser():
    p = cli.ArgumentParser(prog="python -m services.frontend",
                           description="ParM frontend: parm.v1.Frontend and inference.GRPCInferenceService.")
    p.add_argument("--mode", choices=MODES, default="none", help="redundancy mode")
    p.add_argument("--queue-mode", choices=("single_queue", "rr"), default="single_queue",
                   help="shared queues pulled by idle instances, or one queue per instance (round robin)")
    p.add_argument("--k", type=int, default=None, help="coding group size (default: the parity manifest's k, else 2)")
    p.add_argument("--batch-size", type=int, default=1, help="queries per batch")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0, help="max wait to fill a batch, ms")
    p.add_argument("--group-timeout-ms", type=float, default=1000.0,
                   help="max wait to fill a coding group, ms (with --partial-groups pad the wait is "
                        "shorter: the lateness threshold minus the median data-batch latency)")
    p.add_argument("--partial-groups", choices=("pad", "uncoded"), default="pad",
                   help="coded mode: a group that stops waiting with fewer than k members is coded with "
                        "zero batches in the missing places (pad: its parity protects it; the frontend "
                        "computes the model's output for a zero input once, on the CPU) or gets no "
                        "parity (uncoded: the paper)")
    p.add_argument("--instance-timeout-ms", type=float, default=2000.0, help="timeout of every instance call, ms")
    p.add_argument("--query-timeout-ms", type=float, default=30000.0,
                   help="deadline of a query whose client sent none, ms")
    p.add_argument("--model", required=True, help="base model manifest (.json, or the .onnx beside it)")
    p.add_argument("--parity-model", default=None, help="parity model manifest (coded mode)")
    p.add_argument("--backup-model", default=None, help="backup model manifest (cheap mode)")
    p.add_argument("--encoder", choices=("sum", "concat"), default=None,
                   help="encoder (default: the parity manifest's, else sum)")
    p.add_argument("--instances", default="",
                   help="static instances: role=host:port,... (role data|parity|backup; default: none, "
                        "then --registry-url)")
    p.add_argument("--registry-url", default=None,
                   help="redis:// URL of the instance registry (its password may come from "
                        "$PARM_REGISTRY_PASSWORD instead)")
    p.add_argument("--deployment", default="default", help="registry namespace")
    p.add_argument("--registry-poll-ms", type=float, default=500.0, help="registry watch period, ms")
    p.add_argument("--coder", default=None, help="host:port of a parm.v1.Coder service (default: in-process coding_ext)")
    p.add_argument("--coder-timeout-ms", type=float, default=1000.0, help="timeout of coder service calls, ms")
    p.add_argument("--coder-fallback", choices=("local", "none"), default="local",
                   help="when the --coder service is down or slow: code in process (local) or leave the "
                        "group uncoded (none)")
    p.add_argument("--inline-coding-max-bytes", type=int, default=1 << 20,
                   help="encode/decode on the event loop up to this many bytes, else in the executor")
    p.add_argument("--coding-threads", type=int, default=1, help="executor threads for large encodes/decodes")
    p.add_argument("--coding-pool-buffers", type=int, default=DEFAULT_CODING_POOL_BUFFERS,
                   help="coded mode, in-process coding: pinned buffers for parity inputs, and as many for "
                        "reconstructions (one per coding group in flight; when all are out the kernel "
                        "allocates; 0 = no pool)")
    p.add_argument("--max-in-system", type=int, default=10000,
                   help="admitted, unanswered queries beyond which Predict answers RESOURCE_EXHAUSTED")
    p.add_argument("--max-in-flight", type=int, default=2,
                   help="calls in flight per instance; above 1, a second call goes to an instance only "
                        "when every instance of its role is busy (it waits there for the device, "
                        "which then does not idle while the next batch crosses the network)")
    p.add_argument("--max-coalesce", type=int, default=1,
                   help="an instance with a free slot takes up to this many queued batches in one call "
                        "(dynamic batching under load; 1 = off; not in coded mode)")
    p.add_argument("--max-attempts", type=int, default=3, help="instance calls per batch before its queries fail")
    p.add_argument("--hedge-delay-ms", type=float, default=None,
                   help="hedged mode: delay before the second copy (default: recent p95 of instance latency)")
    p.add_argument("--hedge-initial-delay-ms", type=float, default=50.0,
                   help="hedged mode: delay used until enough latencies are known, ms")
    p.add_argument("--decode-policy", choices=DECODE_POLICIES, default="late",
                   help="coded and cheap mode: when a reconstruction (or backup answer) may answer for a "
                        "data batch: at once (immediate, the paper's rule), or only once the batch is late "
                        "(late: formed longer ago than --late-quantile of recent data-batch latencies; "
                        "an original arriving first answers instead)")
    p.add_argument("--late-quantile", type=float, default=0.95,
                   help="late policy: the quantile of recent formed-to-answered data-batch latencies "
                        "that makes a batch late, in (0, 1]")
    p.add_argument("--late-initial-ms", type=float, default=50.0,
                   help="late policy: the lateness threshold until 20 latencies are known, ms")
    p.add_argument("--late-window", type=int, default=1000,
                   help="late policy: how many recent data-batch latencies the quantile is taken over")
    p.add_argument("--late-deadline-margin-ms", type=float, default=2.0,
                   help="late policy: a held reconstruction answers this long before a query's deadline, ms")
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = a free port)")
    p.add_argument("--ready-file", default=None, help="write {port, pid, metrics_port} JSON here once serving")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus HTTP port (0 = a free port; default: off)")
    p.add_argument("--records-dir", default=None, help="write queries.jsonl and groups.jsonl here")
    p.add_argument("--grace-s", type=float, default=2.0, help="graceful shutdown period, s")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help="gRPC send/receive message limit of the server and of every channel, bytes "
                        "(larger messages: RESOURCE_EXHAUSTED)")
    tls_mod.add_arguments(p)
    return p


def check_models(mode, base, parity, backup, encoder, k):
    """Refuses a deployment whose models do not fit together; cli.UsageError naming the mismatch.

    A parity model must have been trained for this base model, with this
    encoder (a parity model trained for ``sum`` fed ``concat`` parities serves
    wrong reconstructions without any error), and give outputs of the base
    model's shape (the decoder subtracts them). A backup model answers in the
    base model's place, so its output shape must match too. In coded mode the
    ``concat`` encoder needs per-example inputs (C, H, W) it can tile: k = 2
    halves the width (W even), k = 4 both sides (H and W even).
    """
    if parity is not None:
        if parity.base_model and parity.base_model != base.name:
            raise cli.UsageError(f"--parity-model {parity.name!r} was trained for base model "
                              f"{parity.base_model!r}, not {base.name!r}")
        if tuple(parity.output_shape) != tuple(base.output_shape):
            raise cli.UsageError(f"--parity-model {parity.name!r} outputs shape {list(parity.output_shape)}, "
                              f"but the base model {base.name!r} outputs {list(base.output_shape)}")
        if parity.encoder and encoder != parity.encoder:
            raise cli.UsageError(f"--encoder {encoder} differs from the encoder the parity model "
                              f"{parity.name!r} was trained with ({parity.encoder})")
    if backup is not None and tuple(backup.output_shape) != tuple(base.output_shape):
        raise cli.UsageError(f"--backup-model {backup.name!r} outputs shape {list(backup.output_shape)}, "
                          f"but the base model {base.name!r} outputs {list(base.output_shape)}")
    if encoder == "concat":
        if k not in (2, 4):
            raise cli.UsageError(f"the concat encoder needs k in (2, 4), got {k}")
        shape = tuple(base.input_shape)
        if mode == "coded":
            if len(shape) != 3:
                raise cli.UsageError(f"the concat encoder needs per-example inputs (C, H, W); model "
                                  f"{base.name!r} takes {list(shape)} (use --encoder sum)")
            _, h, w = shape
            if w % 2 or (k == 4 and h % 2):
                need = "an even width" if k == 2 else "an even height and width"
                raise cli.UsageError(f"the concat encoder with k={k} needs {need}; model {base.name!r} "
                                  f"takes {list(shape)} (use --encoder sum)")


def parse_config(argv):
    """Parses and checks flags; raises cli.UsageError with a one-line message."""
    a = build_parser().parse_args(argv)
    try:
        base = manifest_mod.load(a.model)
        parity = manifest_mod.load(a.parity_model) if a.parity_model else None
        backup = manifest_mod.load(a.backup_model) if a.backup_model else None
    except manifest_mod.ManifestError as exc:
        raise cli.UsageError(str(exc)) from None
    k = a.k if a.k is not None else (parity.k if parity else 2)
    if k < 2:
        raise cli.UsageError(f"--k must be >= 2, got {k}")
    if parity is not None and parity.k != k:
        raise cli.UsageError(f"--k {k} differs from the parity model's k {parity.k}")
    encoder = a.encoder or (parity.encoder if parity else "sum")
    check_models(a.mode, base, parity, backup, encoder, k)
    if a.max_coalesce > 1 and a.mode == "coded":
        raise cli.UsageError("--max-coalesce > 1 is not available in coded mode")
    for name in ("batch_size", "max_in_system", "max_in_flight", "max_coalesce", "max_attempts",
                 "coding_threads"):
        if getattr(a, name) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_timeout_ms", "group_timeout_ms", "instance_timeout_ms", "query_timeout_ms"):
        if getattr(a, name) <= 0:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be > 0")
    if not 0.0 < a.late_quantile <= 1.0:
        raise cli.UsageError(f"--late-quantile must be in (0, 1], got {a.late_quantile}")
    if a.late_window < 1:
        raise cli.UsageError("--late-window must be >= 1")
    if a.late_initial_ms < 0 or a.late_deadline_margin_ms < 0:
        raise cli.UsageError("--late-initial-ms and --late-deadline-margin-ms must be >= 0")
    if a.coding_pool_buffers < 0:
        raise cli.UsageError("--coding-pool-buffers must be >= 0")
    if a.max_message_bytes < 1024:
        raise cli.UsageError("--max-message-bytes must be >= 1024")
    try:
        tls = tls_mod.from_args(a)
    except tls_mod.TlsError as exc:
        raise cli.UsageError(str(exc)) from None
    try:
        instances = tuple(parse_static_instances(a.instances))
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    if not instances and not a.registry_url:
        raise cli.UsageError("give --instances role=host:port,... or --registry-url")
    if instances and a.registry_url:
        raise cli.UsageError("give either --instances or --registry-url, not both")
    return Config(
        mode=a.mode, queue_mode=a.queue_mode, k=k, batch_size=a.batch_size,
        batch_timeout_ms=a.batch_timeout_ms, group_timeout_ms=a.group_timeout_ms,
        instance_timeout_ms=a.instance_timeout_ms, query_timeout_ms=a.query_timeout_ms,
        model=a.model, parity_model=a.parity_model, backup_model=a.backup_model, encoder=encoder,
        instances=instances, registry_url=url_with_env_password(a.registry_url), deployment=a.deployment,
        registry_poll_ms=a.registry_poll_ms, coder=a.coder, coder_timeout_ms=a.coder_timeout_ms,
        inline_coding_max_bytes=a.inline_coding_max_bytes, coding_threads=a.coding_threads,
        max_in_system=a.max_in_system, max_in_flight=a.max_in_flight, max_coalesce=a.max_coalesce,
        max_attempts=a.max_attempts,
        hedge_delay_ms=a.hedge_delay_ms, hedge_initial_delay_ms=a.hedge_initial_delay_ms,
        host=a.host, port=a.port, ready_file=a.ready_file, metrics_port=a.metrics_port,
        records_dir=a.records_dir, grace_s=a.grace_s, log_level=a.log_level,
        max_message_bytes=a.max_message_bytes, tls=tls, coder_fallback=a.coder_fallback,
        decode_policy=a.decode_policy, late_quantile=a.late_quantile, late_initial_ms=a.late_initial_ms,
        late_window=a.late_window, late_deadline_margin_ms=a.late_deadline_margin_ms,
        coding_pool_buffers=a.coding_pool_buffers, partial_groups=a.partial_groups)
