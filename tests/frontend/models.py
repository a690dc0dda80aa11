"""Tiny linear ONNX models (base, parity, backup) for the frontend's tests.

F(x) = flatten(x) @ W with no bias: linear, so the parity model Fp = F makes
``Fp(X1 + ... + Xk) - sum(others)`` equal the missing ``F(Xj)`` (up to float
rounding), which lets the tests check reconstructions exactly.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.common.manifest import Manifest

IN_SHAPE = (4,)
OUT_SHAPE = (3,)
W = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 1.0], [-1.5, 1.0, 0.0]], dtype=np.float32)


def write_linear(directory, name="lin", role="base", k=None, encoder=None, scale=1.0):
    weight = (W * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *IN_SHAPE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *OUT_SHAPE])],
        initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / f"{name}.onnx"))
    Manifest(name=name, role=role, arch="linear", dataset="synthetic", split_seed=0, split={},
             input_shape=IN_SHAPE, input_dtype="float32", output_shape=OUT_SHAPE,
             onnx_file=f"{name}.onnx", k=k, encoder=encoder,
             base_model=None if role == "base" else "lin").save(directory / f"{name}.json")
    return directory / f"{name}.json"


def write_deployment(directory, k=2):
    """Writes base, parity (k, sum) and backup (0.5 W) models; returns their manifest paths."""
    return {
        "base": write_linear(directory),
        "parity": write_linear(directory, f"lin-parity-k{k}-sum", "parity", k=k, encoder="sum"),
        "backup": write_linear(directory, "lin-backup", "backup", scale=0.5),
    }
