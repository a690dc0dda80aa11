"""The model manifest: the JSON file beside every exported ONNX model.

Written by ``models`` (training/export), read by the model server, the
frontend and the load generator. This module imports neither torch nor
grpc. Layout (all keys present; null where not applicable)::

    {
      "name": "mnist-lenet5-parity-k2-sum",
      "role": "base" | "parity" | "backup",
      "arch": "lenet5",
      "dataset": "mnist",
      "split_seed": 0,
      "split": {"train": 3500, "val": 500, "test": 1000},
      "input_shape": [1, 28, 28],           # per example, no batch dim
      "input_dtype": "float32",
      "output_shape": [10],
      "normalization": {"mean": [...], "std": [...]},   # per channel
      "k": 2,                                # parity models only
      "encoder": "sum" | "concat",           # parity models only
      "base_model": "mnist-lenet5",          # parity and backup models
      "onnx_file": "mnist-lenet5-parity-k2-sum.onnx",  # relative to the manifest
      "metrics": {...}
    }

Inputs on the wire are raw examples as the dataset gives them, scaled to
[0, 1] float32; ``normalization`` is applied inside every ONNX graph (base,
parity and backup alike), so clients never normalise. A parity model's input
is the encoder applied to raw examples.
"""

import json
import pathlib
from dataclasses import asdict, dataclass, field

ROLES = ("base", "parity", "backup")
ENCODERS = ("sum", "concat")
DTYPES = ("float32", "float16", "uint8", "int64")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or inconsistent."""


@dataclass(frozen=True)
class Manifest:
    name: str
    role: str
    arch: str
    dataset: str
    split_seed: int
    split: dict
    input_shape: tuple
    input_dtype: str
    output_shape: tuple
    onnx_file: str
    normalization: dict | None = None
    k: int | None = None
    encoder: str | None = None
    base_model: str | None = None
    metrics: dict = field(default_factory=dict)
    # Directory the manifest was loaded from (not serialised).
    directory: str = field(default="", compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ManifestError(f"manifest {self.name!r}: role {self.role!r} not in {ROLES}")
        if self.input_dtype not in DTYPES:
            raise ManifestError(f"manifest {self.name!r}: input_dtype {self.input_dtype!r} not in {DTYPES}")
        if not self.input_shape or any(int(d) <= 0 for d in self.input_shape):
            raise ManifestError(f"manifest {self.name!r}: bad input_shape {list(self.input_shape)}")
        if self.role == "parity":
            if not isinstance(self.k, int) or self.k < 2:
                raise ManifestError(f"manifest {self.name!r}: parity model needs k >= 2, got {self.k!r}")
            if self.encoder not in ENCODERS:
                raise ManifestError(f"manifest {self.name!r}: encoder {self.encoder!r} not in {ENCODERS}")

    @property
    def onnx_path(self):
        return str(pathlib.Path(self.directory) / self.onnx_file)

    def to_json(self):
        data = asdict(self)
        data.pop("directory")
        data["input_shape"] = list(self.input_shape)
        data["output_shape"] = list(self.output_shape)
        return json.dumps(data, indent=2, sort_keys=True)

    def save(self, path):
        pathlib.Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data, directory=""):
        known = {f for f in cls.__dataclass_fields__ if f != "directory"}
        missing = {"name", "role", "arch", "dataset", "split_seed", "split", "input_shape",
                   "input_dtype", "output_shape", "onnx_file"} - set(data)
        if missing:
            raise ManifestError(f"manifest is missing {sorted(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        values["input_shape"] = tuple(int(d) for d in values["input_shape"])
        values["output_shape"] = tuple(int(d) for d in values["output_shape"])
        return cls(**values, directory=str(directory))

    @classmethod
    def from_json(cls, text, directory=""):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        return cls.from_dict(data, directory)


def load(path):
    """Loads a manifest from its JSON path, or from the ``.onnx`` beside it."""
    path = pathlib.Path(path)
    if path.suffix == ".onnx":
        path = path.with_suffix(".json")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    return Manifest.from_json(text, directory=path.parent.resolve())
