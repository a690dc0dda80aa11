import numpy as np
import pytest

from tests.loadgen.fake_frontend import FakeFrontend, make_inputs
from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending


@pytest.fixture
def inputs_npz(tmp_path):
    x, y = make_inputs(50)
    path = tmp_path / "inputs.npz"
    np.savez(path, X=x, y=y)
    return path


@pytest.fixture
def fake_frontend():
    with FakeFrontend() as fe:
        yield fe
