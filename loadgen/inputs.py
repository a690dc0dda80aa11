"""Where the examples come from, so every answer can be scored.

In order of precedence:

1. ``inputs_path``: an ``.npz`` file with arrays ``X`` (examples, per-example
   shape, already scaled as the frontend expects) and ``y`` (int labels).
2. ``manifest_json`` (a base model manifest, ``services.common.manifest``):
   the test split of its dataset via ``datasplits.load_split(dataset,
   split="test", split_seed=...)``, imported only here.
3. The frontend's ``GetStatus``: its ``manifest_json``, else its
   ``manifest_path`` when that file is readable on this host.
"""

import pathlib

import numpy as np

from services.common.manifest import Manifest, ManifestError


class InputsError(ValueError):
    """The examples to send could not be determined or loaded."""


def load_npz(path):
    """(X, y) from an .npz with arrays ``X`` and ``y``."""
    try:
        with np.load(path) as data:
            x, y = data["X"], data["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputsError(f"cannot read inputs {path} (need an .npz with arrays X and y): {exc}") from None
    if len(x) != len(y) or len(x) == 0:
        raise InputsError(f"inputs {path}: {len(x)} examples but {len(y)} labels")
    return x, np.asarray(y, dtype=np.int64)


def load_from_manifest(manifest):
    """(X, y): the test split of the manifest's dataset, in its input dtype."""
    try:
        from datasplits import load_split
    except ImportError as exc:
        raise InputsError(f"cannot load dataset {manifest.dataset!r}: datasplits is unavailable "
                          f"({exc}); pass --inputs FILE.npz") from None
    try:
        x, y = load_split(manifest.dataset, split="test", split_seed=manifest.split_seed)
    except (ValueError, KeyError, OSError) as exc:
        raise InputsError(f"cannot load the test split of {manifest.dataset!r}: {exc}") from None
    x = np.asarray(x)
    if tuple(x.shape[1:]) != tuple(manifest.input_shape):
        raise InputsError(f"dataset {manifest.dataset!r} gives examples of shape {list(x.shape[1:])}, "
                          f"the model expects {list(manifest.input_shape)}")
    return x.astype(manifest.input_dtype, copy=False), np.asarray(y, dtype=np.int64)


def resolve(inputs_path="", manifest_json="", status=None):
    """(X, y, source description) by the precedence in the module docstring."""
    if inputs_path:
        x, y = load_npz(inputs_path)
        return x, y, f"inputs {inputs_path}"
    text = manifest_json
    where = "the given manifest"
    if not text and status is not None:
        text = status.manifest_json
        where = "the frontend's manifest"
        if not text and status.manifest_path:
            try:
                text = pathlib.Path(status.manifest_path).read_text()
                where = f"manifest {status.manifest_path}"
            except OSError:
                text = ""
    if not text:
        raise InputsError("cannot tell which dataset to send: the frontend reports no manifest; "
                          "pass --manifest PATH or --inputs FILE.npz")
    try:
        manifest = Manifest.from_json(text)
    except ManifestError as exc:
        raise InputsError(f"{where}: {exc}") from None
    x, y = load_from_manifest(manifest)
    return x, y, f"{manifest.dataset} test split ({where})"
