"""Experiment sweep configs: parsing, validation, and the runs they expand to.

A config is a JSON object with the original ParM fields (same names and
meaning) plus local fields. Every list-valued sweep field is crossed with the
others; ``num_trials`` repeats each combination. A scalar is accepted wherever
a list is (``"num_models": 2`` == ``[2]``), as the original's configs mixed
both.

Original fields: ``experiment_id``, ``frontend_type``, ``worker_type``,
``client_type`` (AWS instance types), ``model``, ``queue_modes``,
``redundancy_modes``, ``num_models``, ``ec_k_val``, ``batch_sizes``,
``num_clients``, ``send_rates`` (aggregate Poisson rate, queries/s, split over
the clients), ``background_traffic`` (integer number of concurrent shuffles,
or ``"clipper"``), ``num_queries``, ``num_trials``.

Local fields (all optional, defaults below): ``warmup_queries``, ``seed``,
``encoder`` (``sum``/``concat``), ``deadline_s``, ``batch_timeout_ms``,
``network`` (``"auto"``: the namespace testbed where this machine can make
it, else the emulated network, as ``configs/local.json`` says; ``"netns"``;
``"emulated"``, the default),
``decode_policy`` (a sweep field, a list or one value: ``"immediate"``/``"late"``, passed to the
frontend as ``--decode-policy`` only when given, and only to the modes that
answer with a substitute, ``coded`` and ``cheap``), ``partial_groups`` (a
sweep field like it: ``"pad"``/``"uncoded"``, passed as ``--partial-groups``
only when given, and only to ``coded`` runs), ``max_in_flight`` (a sweep field
like them: calls the frontend keeps in flight per instance, passed as
``--max-in-flight`` to every mode only when given; the frontend's default
applies otherwise), and ``emulation``:

    "emulation": {
      "compute": {"kind": "lognormal", "params": {"median_ms": 8, "sigma": 0.25}},
      "background": {                  # default: the fitted values of
        "bandwidth_mbps": ...,         #   configs/emulation-calibrated.json
        "size_mb": [low, high],        # uniform size of one transfer (MB)
        "delay": {"kind": "exponential", "params": {"mean_ms": ...}},
        "stall_probability": ...,      # per query on a touched instance
        "stall_ms": ...                # a retransmission timeout's extra delay
      },
      "clipper": {"rate": 20, "num_models": 2}
    }

Invalid configs fail at once with a ``ConfigError`` naming the field.
"""

import functools
import itertools
import json
import pathlib
from dataclasses import dataclass, field, replace

REDUNDANCY_MODES = ("none", "equal", "coded", "cheap", "hedged")
QUEUE_MODES = ("single_queue", "rr")
ENCODERS = ("sum", "concat")
NETWORKS = ("auto", "emulated", "netns")
DECODE_POLICIES = ("immediate", "late")
DISTRIBUTION_KINDS = ("none", "constant", "uniform", "exponential", "lognormal", "normal")

DEFAULT_COMPUTE = {"kind": "lognormal", "params": {"median_ms": 8.0, "sigma": 0.25}}
#: The emulated background model's defaults: fitted to the namespace testbed
#: by ``python -m deploy.network.calibrate`` (the file says by what command,
#: when and on which machine).
CALIBRATION_PATH = pathlib.Path(__file__).resolve().parents[2] / "configs" / "emulation-calibrated.json"
_BACKGROUND_KEYS = ("bandwidth_mbps", "size_mb", "delay", "stall_probability", "stall_ms")
DEFAULT_CLIPPER = {"rate": 20.0, "num_models": 2}

_SWEEP_FIELDS = (
    "queue_modes", "redundancy_modes", "num_models", "ec_k_val", "batch_sizes",
    "num_clients", "send_rates", "background_traffic", "num_queries", "decode_policy", "partial_groups",
    "max_in_flight",
)
_KNOWN = set(_SWEEP_FIELDS) | {
    "experiment_id", "frontend_type", "worker_type", "client_type", "model",
    "num_trials", "warmup_queries", "seed", "encoder", "deadline_s",
    "batch_timeout_ms", "network", "emulation", "description", "artifacts",
    "s3_path",  # deprecated in the original; accepted and ignored
}


# Modes whose answers can be a substitute (a reconstruction, a backup's answer): the
# decode policy applies to them.
SUBSTITUTING_MODES = ("coded", "cheap")
PARTIAL_GROUPS = ("pad", "uncoded")     # the frontend's --partial-groups


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: one deployment, one load."""

    experiment_id: str
    model: str
    redundancy_mode: str
    queue_mode: str
    num_models: int
    k: int
    batch_size: int
    num_clients: int
    send_rate: float
    background: object  # int shuffles or "clipper"
    num_queries: int
    trial: int
    warmup_queries: int
    seed: int
    encoder: str
    deadline_s: float
    batch_timeout_ms: float
    network: str
    compute: dict
    background_model: dict
    clipper: dict
    decode_policy: str | None = None
    partial_groups: str | None = None
    max_in_flight: int | None = None

    @property
    def num_instances(self):
        """Instances by role: (data, parity, backup) for this mode (DESIGN s4)."""
        extra = self.num_models // self.k
        if self.redundancy_mode == "none":
            return self.num_models, 0, 0
        if self.redundancy_mode in ("equal", "hedged"):
            return self.num_models + extra, 0, 0
        if self.redundancy_mode == "coded":
            return self.num_models, extra, 0
        return self.num_models, 0, extra  # cheap

    @property
    def name(self):
        """A folder name that identifies the run inside its experiment."""
        bg = self.background if self.background == "clipper" else f"{self.background}"
        return (
            f"mode_{self.redundancy_mode}-q_{self.queue_mode}-n_{self.num_models}-k_{self.k}"
            f"-bs_{self.batch_size}-rate_{self.send_rate:g}-bg_{bg}-c_{self.num_clients}"
            f"-nq_{self.num_queries}{f'-dp_{self.decode_policy}' if self.decode_policy else ''}"
            f"{f'-pg_{self.partial_groups}' if self.partial_groups else ''}"
            f"{f'-mif_{self.max_in_flight}' if self.max_in_flight else ''}-it_{self.trial}"
        )

    def to_dict(self):
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class SweepConfig:
    experiment_id: str
    model: str
    queue_modes: tuple
    redundancy_modes: tuple
    num_models: tuple
    ec_k_val: tuple
    batch_sizes: tuple
    num_clients: tuple
    send_rates: tuple
    background_traffic: tuple
    num_queries: tuple
    num_trials: int = 1
    frontend_type: str = "local"
    worker_type: str = "local"
    client_type: str = "local"
    warmup_queries: int = 100
    seed: int = 0
    encoder: str = "sum"
    deadline_s: float = 10.0
    batch_timeout_ms: float = 5.0
    network: str = "emulated"
    compute: dict = field(default_factory=lambda: dict(DEFAULT_COMPUTE))
    background_model: dict = field(default_factory=lambda: default_background())
    clipper: dict = field(default_factory=lambda: dict(DEFAULT_CLIPPER))
    description: str = ""
    source_path: str = ""
    decode_policies: tuple = (None,)
    partial_groups: tuple = (None,)
    max_in_flight: tuple = (None,)

    def runs(self):
        """Every combination, trials innermost-but-one and modes innermost.

        Modes vary fastest so that the runs compared with each other (equal
        vs coded at one rate) are adjacent in time. ``none`` does not depend
        on k, so it runs once per other combination (with the first k).
        """
        seen = set()
        out = []
        for (qm, n, bs, nc, rate, bg, nq, k, trial, mif, policy, pg, mode) in itertools.product(
            self.queue_modes, self.num_models, self.batch_sizes, self.num_clients,
            self.send_rates, self.background_traffic, self.num_queries,
            self.ec_k_val, range(self.num_trials), self.max_in_flight, self.decode_policies,
            self.partial_groups, self.redundancy_modes,
        ):
            if mode not in SUBSTITUTING_MODES and policy is not None and policy != self.decode_policies[0]:
                continue  # the decode policy changes only coded and cheap runs: the others run once
            if mode != "coded" and pg is not None and pg != self.partial_groups[0]:
                continue  # so does the partial-groups choice, for coded runs only
            if mode == "none":
                key = (qm, n, bs, nc, rate, bg, nq, trial, mif, mode)
                if key in seen:
                    continue
                seen.add(key)
            out.append(RunSpec(
                experiment_id=self.experiment_id, model=self.model,
                redundancy_mode=mode, queue_mode=qm, num_models=n, k=k,
                batch_size=bs, num_clients=nc, send_rate=float(rate), background=bg,
                num_queries=nq, trial=trial, warmup_queries=self.warmup_queries,
                seed=self.seed + trial, encoder=self.encoder, deadline_s=self.deadline_s,
                batch_timeout_ms=self.batch_timeout_ms, network=self.network,
                compute=self.compute, background_model=self.background_model,
                clipper=self.clipper, decode_policy=policy if mode in SUBSTITUTING_MODES else None,
                partial_groups=pg if mode == "coded" else None, max_in_flight=mif,
            ))
        return out

    def with_overrides(self, **changes):
        return replace(self, **changes)


def _as_list(data, name, kind, *, allowed=None, minimum=None):
    value = data[name]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"field {name!r}: must not be empty")
    out = []
    for item in items:
        if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise ConfigError(f"field {name!r}: expected integers, got {item!r}")
        if kind is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise ConfigError(f"field {name!r}: expected numbers, got {item!r}")
        if kind is str and not isinstance(item, str):
            raise ConfigError(f"field {name!r}: expected strings, got {item!r}")
        if allowed is not None and item not in allowed:
            raise ConfigError(f"field {name!r}: {item!r} is not one of {list(allowed)}")
        if minimum is not None and item < minimum:
            raise ConfigError(f"field {name!r}: {item!r} is below the minimum {minimum}")
        out.append(kind(item))
    return tuple(out)


def _distribution(value, name):
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"field {name!r}: expected {{\"kind\": ..., \"params\": {{...}}}}")
    if value["kind"] not in DISTRIBUTION_KINDS:
        raise ConfigError(f"field {name!r}: kind {value['kind']!r} is not one of {list(DISTRIBUTION_KINDS)}")
    params = value.get("params", {})
    if not isinstance(params, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in params.values()
    ):
        raise ConfigError(f"field {name!r}: params must map names to non-negative numbers")
    return {"kind": value["kind"], "params": {k: float(v) for k, v in params.items()}}


@functools.lru_cache(maxsize=None)
def _calibrated(path):
    return load_calibration(path)


def default_background():
    """The emulated background model's defaults: the calibration file's fitted values.

    None when the file is not there (an installed wheel on an AWS node, which
    runs real shuffles and never needs it); a sweep that then needs an
    emulated background fails at that point, naming the file.
    """
    if not CALIBRATION_PATH.exists():
        return None
    return dict(_calibrated(str(CALIBRATION_PATH)))


def load_calibration(path):
    """The ``background`` model of a calibration file (``deploy.network.calibrate``), validated."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"calibration file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("background"), dict):
        raise ConfigError(f"calibration file {path}: expected an object with a 'background' object")
    missing = [k for k in _BACKGROUND_KEYS if k not in data["background"]]
    if missing:
        raise ConfigError(f"calibration file {path}: 'background' lacks {missing}")
    return _background({"background": data["background"]}, base={})


def _background(data, base=None):
    bg = default_background() if base is None else dict(base)
    given = data.get("background", {})
    if not isinstance(given, dict):
        raise ConfigError("field 'emulation.background': expected an object")
    if bg is None:
        if not given:
            return None
        if set(given) != set(_BACKGROUND_KEYS):
            raise ConfigError(f"field 'emulation.background': give all of {list(_BACKGROUND_KEYS)} "
                              f"(the defaults' file {CALIBRATION_PATH} is missing)")
        bg = {}
    unknown = set(given) - set(_BACKGROUND_KEYS)
    if unknown:
        raise ConfigError(f"field 'emulation.background': unknown keys {sorted(unknown)}")
    bg.update(given)
    name = "emulation.background"
    if not all(isinstance(bg[k], (int, float)) and not isinstance(bg[k], bool)
               for k in ("bandwidth_mbps", "stall_probability", "stall_ms")):
        raise ConfigError(f"field '{name}': bandwidth_mbps, stall_probability and stall_ms must be numbers")
    if not isinstance(bg["bandwidth_mbps"], (int, float)) or bg["bandwidth_mbps"] <= 0:
        raise ConfigError(f"field '{name}.bandwidth_mbps': must be a positive number")
    size = bg["size_mb"]
    if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(s, (int, float)) for s in size)
            or not 0 < size[0] <= size[1]):
        raise ConfigError(f"field '{name}.size_mb': expected [low, high] with 0 < low <= high")
    if not 0 <= bg["stall_probability"] <= 1:
        raise ConfigError(f"field '{name}.stall_probability': must be within [0, 1]")
    if bg["stall_ms"] < 0:
        raise ConfigError(f"field '{name}.stall_ms': must be >= 0")
    bg["delay"] = _distribution(bg["delay"], f"{name}.delay")
    bg["size_mb"] = [float(s) for s in size]
    for key in ("bandwidth_mbps", "stall_probability", "stall_ms"):
        bg[key] = float(bg[key])
    return bg


def parse(data, source_path=""):
    """Validates a config dict and returns a ``SweepConfig``."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a JSON object")
    unknown = set(data) - _KNOWN
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    for name in ("experiment_id", "redundancy_modes", "send_rates", "num_queries"):
        if name not in data:
            raise ConfigError(f"field {name!r} is required")
    exp = data["experiment_id"]
    if not isinstance(exp, str) or not exp or not all(c.isalnum() or c in "-_." for c in exp):
        raise ConfigError(f"field 'experiment_id': expected a name of letters, digits, '-', '_', '.', got {exp!r}")
    data = dict(data)
    data.setdefault("queue_modes", ["single_queue"])
    data.setdefault("num_models", [2])
    data.setdefault("ec_k_val", [2])
    data.setdefault("batch_sizes", [1])
    data.setdefault("num_clients", [1])
    data.setdefault("background_traffic", [0])
    policies = data.get("decode_policy")
    decode_policies = (None,) if policies is None else _as_list(data, "decode_policy", str,
                                                                allowed=DECODE_POLICIES)
    pg = data.get("partial_groups")
    partial_groups = (None,) if pg is None else _as_list(data, "partial_groups", str, allowed=PARTIAL_GROUPS)
    mif = data.get("max_in_flight")
    max_in_flight = (None,) if mif is None else _as_list(data, "max_in_flight", int, minimum=1)
    bg_items = data["background_traffic"] if isinstance(data["background_traffic"], list) else [data["background_traffic"]]
    for item in bg_items:
        if item != "clipper" and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            raise ConfigError(f"field 'background_traffic': expected shuffle counts >= 0 or \"clipper\", got {item!r}")
    if not bg_items:
        raise ConfigError("field 'background_traffic': must not be empty")
    emulation = data.get("emulation", {})
    if not isinstance(emulation, dict):
        raise ConfigError("field 'emulation': expected an object")
    unknown = set(emulation) - {"compute", "background", "clipper"}
    if unknown:
        raise ConfigError(f"field 'emulation': unknown keys {sorted(unknown)}")
    clipper = dict(DEFAULT_CLIPPER, **emulation.get("clipper", {}))
    num_trials = data.get("num_trials", 1)
    if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
        raise ConfigError(f"field 'num_trials': expected an integer >= 1, got {num_trials!r}")
    cfg = SweepConfig(
        experiment_id=exp,
        model=_scalar(data, "model", str, "default"),
        queue_modes=_as_list(data, "queue_modes", str, allowed=QUEUE_MODES),
        redundancy_modes=_as_list(data, "redundancy_modes", str, allowed=REDUNDANCY_MODES),
        num_models=_as_list(data, "num_models", int, minimum=1),
        ec_k_val=_as_list(data, "ec_k_val", int, minimum=2),
        batch_sizes=_as_list(data, "batch_sizes", int, minimum=1),
        num_clients=_as_list(data, "num_clients", int, minimum=1),
        send_rates=_as_list(data, "send_rates", float, minimum=0.001),
        background_traffic=tuple(bg_items),
        num_queries=_as_list(data, "num_queries", int, minimum=1),
        num_trials=num_trials,
        frontend_type=_scalar(data, "frontend_type", str, "local"),
        worker_type=_scalar(data, "worker_type", str, "local"),
        client_type=_scalar(data, "client_type", str, "local"),
        warmup_queries=_scalar(data, "warmup_queries", int, 100),
        seed=_scalar(data, "seed", int, 0),
        encoder=_scalar(data, "encoder", str, "sum"),
        deadline_s=float(_scalar(data, "deadline_s", (int, float), 10.0)),
        batch_timeout_ms=float(_scalar(data, "batch_timeout_ms", (int, float), 5.0)),
        network=_scalar(data, "network", str, "emulated"),
        compute=_distribution(emulation.get("compute", DEFAULT_COMPUTE), "emulation.compute"),
        background_model=_background(emulation),
        clipper=clipper,
        description=_scalar(data, "description", str, ""),
        source_path=str(source_path),
        decode_policies=decode_policies,
        partial_groups=partial_groups,
        max_in_flight=max_in_flight,
    )
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"field 'encoder': {cfg.encoder!r} is not one of {list(ENCODERS)}")
    if cfg.network not in NETWORKS:
        raise ConfigError(f"field 'network': {cfg.network!r} is not one of {list(NETWORKS)}")
    if cfg.warmup_queries < 0:
        raise ConfigError("field 'warmup_queries': must be >= 0")
    if cfg.deadline_s <= 0:
        raise ConfigError("field 'deadline_s': must be > 0")
    if cfg.encoder == "concat" and any(k not in (2, 4) for k in cfg.ec_k_val):
        raise ConfigError("field 'ec_k_val': the concat encoder supports k = 2 and 4 only")
    for n in cfg.num_models:
        for k in cfg.ec_k_val:
            if n % k:
                raise ConfigError(
                    f"field 'num_models': {n} is not a multiple of k={k} (N/k parity or backup instances)"
                )
    return cfg


def _scalar(data, name, kind, default):
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"field {name!r}: expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
    return value


def load(path):
    """Reads and validates a config file; ``ConfigError`` on any problem."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from None
    return parse(data, source_path=path)
