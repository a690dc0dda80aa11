"""ONNX export: ONNX Runtime equals PyTorch; graphs and manifests keep the contract."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import datasplits
from models import checkpoint, export
from services.common import manifest as manifest_mod

ROLES = {"base": 1, "parity": 5, "backup": 1}


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _manifests(directory):
    return [manifest_mod.load(p) for p in sorted(directory.glob("*.json"))
            if p.name not in ("index.json", "evaluation.json")]


def test_onnx_runtime_equals_pytorch_on_the_same_inputs(tiny_artifacts):
    X, _ = datasplits.load_split("mnist", "test")
    for m in _manifests(tiny_artifacts):
        model, _ = checkpoint.load(tiny_artifacts / "checkpoints" / f"{m.name}.pt")
        for batch in (X[:1], X[:7], np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32) * 4):
            diff, got, want = export.compare(model, m.onnx_path, batch, threads=1)
            assert got.shape == (len(batch), 10)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=m.name)


def test_graphs_have_named_float32_io_with_a_dynamic_batch(tiny_artifacts):
    for m in _manifests(tiny_artifacts):
        graph = onnx.load(m.onnx_path).graph
        (inp,), (out,) = graph.input, graph.output
        assert (inp.name, out.name) == ("input", "output")
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value
        assert [d.dim_value for d in dims[1:]] == list(m.input_shape)
        assert [d.dim_value for d in out.type.tensor_type.shape.dim[1:]] == list(m.output_shape)


def test_normalisation_is_inside_the_graph(tiny_artifacts):
    base = manifest_mod.load(tiny_artifacts / "mnist-lenet5-wide.json")
    model, _ = checkpoint.load(tiny_artifacts / "checkpoints" / "mnist-lenet5-wide.pt")
    X, _ = datasplits.load_split("mnist", "val")
    raw = _session(base.onnx_path).run(["output"], {"input": X[:8]})[0]
    net_on_normalised = model.net((__import__("torch").from_numpy(X[:8]) - base.normalization["mean"][0])
                                  / base.normalization["std"][0]).detach().numpy()
    np.testing.assert_allclose(raw, net_on_normalised, rtol=1e-4, atol=1e-4)


def test_manifests_describe_every_model(tiny_artifacts):
    manifests = _manifests(tiny_artifacts)
    assert {r: sum(m.role == r for m in manifests) for r in ROLES} == ROLES
    by_name = {m.name: m for m in manifests}
    base = by_name["mnist-lenet5-wide"]
    assert base.arch == "lenet5-wide" and base.dataset == "mnist" and base.split_seed == 0
    assert base.split == {"train": 3500, "val": 500, "test": 1000}
    assert base.input_shape == (1, 28, 28) and base.input_dtype == "float32" and base.output_shape == (10,)
    assert base.normalization == datasplits.normalization("mnist")
    assert base.k is None and base.encoder is None and base.base_model is None
    assert 0.0 <= base.metrics["test_top1"] <= 1.0
    for name, k, encoder in [("mnist-lenet5-wide-parity-k3-sum", 3, "sum"),
                             ("mnist-lenet5-wide-parity-k4-concat", 4, "concat")]:
        p = by_name[name]
        assert (p.role, p.k, p.encoder, p.base_model, p.arch) == ("parity", k, encoder, base.name, base.arch)
        assert p.input_shape == base.input_shape
        assert {"degraded_top1", "degraded_top5", "agreement", "val_degraded_top1"} <= set(p.metrics)
    backup = by_name["mnist-lenet5-wide-backup"]
    assert (backup.role, backup.arch, backup.base_model) == ("backup", "tinymlp", base.name)
    # What the model server reads: the manifest on disk is plain JSON.
    raw = json.loads((tiny_artifacts / "mnist-lenet5-wide-parity-k2-sum.json").read_text())
    assert raw["onnx_file"] == "mnist-lenet5-wide-parity-k2-sum.onnx" and raw["k"] == 2


def test_sum_parity_graph_normalises_with_group_statistics(tiny_artifacts):
    base = manifest_mod.load(tiny_artifacts / "mnist-lenet5-wide.json")
    p3 = manifest_mod.load(tiny_artifacts / "mnist-lenet5-wide-parity-k3-sum.json")
    assert p3.normalization["mean"][0] == pytest.approx(3 * base.normalization["mean"][0])
    assert p3.normalization["std"][0] == pytest.approx(3 ** 0.5 * base.normalization["std"][0])
