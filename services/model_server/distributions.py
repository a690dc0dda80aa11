"""Named, seeded delay distributions (``parm.v1.Distribution``) in milliseconds.

Kinds and parameters (all ``_ms`` values >= 0):

| kind | parameters | sample |
|---|---|---|
| ``none`` | - | 0 |
| ``constant`` | ``value_ms`` | value_ms |
| ``uniform`` | ``low_ms``, ``high_ms`` | U(low, high) |
| ``exponential`` | ``mean_ms`` | Exp(mean) |
| ``lognormal`` | ``median_ms``, ``sigma`` | median * exp(sigma * N(0, 1)) |
| ``normal`` | ``mean_ms``, ``std_ms`` | max(0, N(mean, std)) |

A ``DistSpec`` is the validated, immutable description; a ``Sampler`` pairs
it with its own ``numpy.random.Generator`` (PCG64 seeded with ``seed``), so
two samplers built from the same spec draw the same sequence.
"""

from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidInput

PARAMS = {
    "none": (),
    "constant": ("value_ms",),
    "uniform": ("low_ms", "high_ms"),
    "exponential": ("mean_ms",),
    "lognormal": ("median_ms", "sigma"),
    "normal": ("mean_ms", "std_ms"),
}


@dataclass(frozen=True)
class DistSpec:
    kind: str = "none"
    params: tuple = ()  # sorted (name, value) pairs
    seed: int = 0

    def __post_init__(self):
        if self.kind not in PARAMS:
            raise InvalidInput(f"distribution kind {self.kind!r} not in {sorted(PARAMS)}")
        given = dict(self.params)
        expected = set(PARAMS[self.kind])
        if set(given) != expected:
            raise InvalidInput(
                f"distribution {self.kind!r} takes parameters {sorted(expected)}, got {sorted(given)}"
            )
        for name, value in given.items():
            if not np.isfinite(value) or value < 0:
                raise InvalidInput(f"distribution {self.kind!r}: {name} = {value} must be finite and >= 0")
        if self.kind == "uniform" and given["low_ms"] > given["high_ms"]:
            raise InvalidInput(f"distribution 'uniform': low_ms {given['low_ms']} > high_ms {given['high_ms']}")
        if self.seed < 0:
            raise InvalidInput(f"distribution seed {self.seed} must be >= 0")

    @classmethod
    def make(cls, kind="none", params=None, seed=0):
        kind = kind or "none"
        return cls(kind, tuple(sorted((str(k), float(v)) for k, v in (params or {}).items())), int(seed))

    @property
    def is_none(self):
        return self.kind == "none"

    def to_proto(self, msg):
        msg.kind = self.kind
        msg.params.clear()
        msg.params.update(dict(self.params))
        msg.seed = self.seed
        return msg

    @classmethod
    def from_proto(cls, msg):
        return cls.make(msg.kind, dict(msg.params), msg.seed)

    def describe(self):
        if self.is_none:
            return "none"
        args = ",".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.kind}({args}; seed={self.seed})"


def parse_params(text):
    """``"median_ms=5,sigma=0.3"`` -> {"median_ms": 5.0, "sigma": 0.3}; ValueError if malformed."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"parameter {part!r} is not NAME=VALUE")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"parameter {name.strip()}: {value!r} is not a number") from None
    return out


class Sampler:
    """Draws delays (ms) from a ``DistSpec`` with its own seeded generator."""

    def __init__(self, spec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)

    def sample_ms(self):
        s, p = self.spec, dict(self.spec.params)
        if s.kind == "none":
            return 0.0
        if s.kind == "constant":
            return p["value_ms"]
        if s.kind == "uniform":
            return float(self.rng.uniform(p["low_ms"], p["high_ms"]))
        if s.kind == "exponential":
            return float(self.rng.exponential(p["mean_ms"])) if p["mean_ms"] > 0 else 0.0
        if s.kind == "lognormal":
            return float(p["median_ms"] * np.exp(p["sigma"] * self.rng.standard_normal()))
        return max(0.0, float(self.rng.normal(p["mean_ms"], p["std_ms"])))
