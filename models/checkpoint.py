"""Checkpoints: a trained network plus everything needed to rebuild and export it.

A checkpoint is a ``torch.save`` of a dict::

    {"format": FORMAT, "role": "base" | "parity" | "backup", "name": str,
     "arch": str, "dataset": str, "split_seed": int, "input_shape": [C, H, W],
     "num_classes": int, "normalization": {"mean": [...], "std": [...]},
     "k": int | None, "encoder": str | None, "base_model": str | None,
     "base_checkpoint": str | None, "metrics": {...}, "config": {...},
     "state_dict": state dict of models.archs.Normalized}
"""

import pathlib

import torch

from models import archs

FORMAT = "parm-models-1"


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint, or one of the wrong kind."""


def save(path, model, **meta):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, **meta, "state_dict": state}, path)


def load_meta(path):
    """The checkpoint dict at ``path`` (state_dict included)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a models checkpoint (format {FORMAT})")
    return data


def build_model(meta):
    """An (untrained) Normalized network shaped as the checkpoint ``meta`` describes."""
    net = archs.build(meta["arch"], tuple(meta["input_shape"]), meta["num_classes"])
    norm = meta["normalization"]
    return archs.Normalized(net, norm["mean"], norm["std"])


def load(path, role=None):
    """Returns (model in eval mode, meta) from the checkpoint at ``path``.

    Raises:
        CheckpointError: missing/unreadable file, or role differs from ``role``.
    """
    meta = load_meta(path)
    if role is not None and meta["role"] != role:
        raise CheckpointError(f"checkpoint {path} is a {meta['role']} model, expected a {role} model")
    model = build_model(meta)
    model.load_state_dict(meta["state_dict"])
    model.eval()
    return model, meta
