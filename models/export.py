"""ONNX export of a checkpoint, with its manifest beside it.

    python -m models.export --checkpoint ckpt/base.pt --out artifacts/

writes ``<name>.onnx`` and ``<name>.json`` (a ``services.common.manifest``
Manifest). The graph takes raw [0, 1] float32 examples ("input", shape
(batch, C, H, W), batch dynamic), normalises them inside, and returns raw
outputs ("output", shape (batch, num_classes)).
"""

import pathlib
import sys
import warnings

import numpy as np
import onnx
import torch

import datasplits
from models import checkpoint, cli
from services.common.manifest import Manifest

OPSET = 17


def export_onnx(model, input_shape, path):
    """Writes ``model`` (a Normalized network) to ``path`` as ONNX with a dynamic batch dimension."""
    model.eval()
    dummy = torch.rand(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


def manifest_for(meta, onnx_file, split, metrics=None):
    """The Manifest of checkpoint ``meta`` exported as ``onnx_file``."""
    return Manifest(
        name=meta["name"], role=meta["role"], arch=meta["arch"], dataset=meta["dataset"],
        split_seed=meta["split_seed"], split=dict(split), input_shape=tuple(meta["input_shape"]),
        input_dtype="float32", output_shape=(meta["num_classes"],), onnx_file=onnx_file,
        normalization=meta["normalization"], k=meta["k"], encoder=meta["encoder"],
        base_model=meta["base_model"], metrics=dict(metrics if metrics is not None else meta["metrics"]))


def export_checkpoint(checkpoint_path, out_dir, data_root=None, metrics=None):
    """Exports the checkpoint to ``out_dir/<name>.onnx`` + ``<name>.json``; returns the Manifest."""
    model, meta = checkpoint.load(checkpoint_path)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_file = f"{meta['name']}.onnx"
    export_onnx(model, tuple(meta["input_shape"]), out_dir / onnx_file)
    split = datasplits.split_sizes(meta["dataset"], meta["split_seed"], data_root)
    manifest = manifest_for(meta, onnx_file, split, metrics)
    manifest.save(out_dir / f"{meta['name']}.json")
    return manifest


def compare(model, onnx_path, X, threads=1):
    """Largest |ONNX Runtime - torch| over examples X (ndarray (N, C, H, W), float32)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": X})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(X)).numpy()
    return float(np.abs(got - want).max()), got, want


def build_parser():
    parser = cli.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by models.train")
    parser.add_argument("--out", required=True, help="directory for <name>.onnx and <name>.json")
    parser.add_argument("--data-root", default=None, help="directory of torchvision-format datasets")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    manifest = export_checkpoint(args.checkpoint, args.out, args.data_root)
    print(f"{manifest.name}: {pathlib.Path(args.out) / manifest.onnx_file}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], "python -m models.export"))
