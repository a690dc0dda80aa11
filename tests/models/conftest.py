"""A tiny real artifact set, built once per session (a few seconds of training)."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """Directory of ``models.build --tiny``: real (inaccurate) models, manifests, index."""
    from models import build
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("artifacts")
    # jobs=2: the parity and backup models train in worker processes, as in `make models`.
    build.build(out, build.TINY, progress=False, threads=1, jobs=2, log=lambda *_: None)
    return out
