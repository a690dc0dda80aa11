"""Degraded-mode evaluation of exported models, on the served path.

    python -m models.evaluate [--artifacts artifacts] [--json PATH]

For every base model in the artifacts directory (manifests beside ONNX
files), on its dataset's test split: the base model's top-1/top-5; for each
of its parity models (each k and encoder), degraded-mode top-1 and top-5 and
agreement with the base model's argmax (``models.degraded``: every group of
several seeded groupings, every possible single erasure); the backup model's
top-1; and the "default output" baseline (answer the most frequent training
label whenever a prediction is missing). Models run in ONNX Runtime; queries
are encoded and decoded by ``coding_ext`` (the serving coder).
"""

import json
import pathlib
import sys

import numpy as np

import datasplits
from models import cli, coding, degraded
from services.common import manifest as manifest_mod

NOT_MANIFESTS = ("index.json", "evaluation.json")


def load_manifests(directory):
    """Every model manifest in ``directory`` (a Manifest per ``*.json`` beside an ``.onnx``)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no artifacts directory {directory}")
    found = []
    for path in sorted(directory.glob("*.json")):
        if path.name in NOT_MANIFESTS:
            continue
        found.append(manifest_mod.load(path))
    if not any(m.role == "base" for m in found):
        raise ValueError(f"no base model manifest in {directory} (run `make models`)")
    return found


class Runner:
    """An ONNX Runtime session over one manifest's model: raw examples in, outputs out."""

    def __init__(self, manifest, threads=1):
        import onnxruntime as ort
        path = pathlib.Path(manifest.onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"missing ONNX file {path} of manifest {manifest.name!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.manifest = manifest

    def __call__(self, X, batch_size=1024):
        X = np.ascontiguousarray(X, dtype=np.float32)
        return np.concatenate([self.session.run(["output"], {"input": X[i:i + batch_size]})[0]
                               for i in range(0, len(X), batch_size)])


def _check_parity(base, parity):
    if parity.dataset != base.dataset or tuple(parity.input_shape) != tuple(base.input_shape):
        raise ValueError(f"parity model {parity.name!r} ({parity.dataset}, {list(parity.input_shape)}) does not "
                         f"match base {base.name!r} ({base.dataset}, {list(base.input_shape)})")
    if parity.encoder == "concat" and parity.k not in (2, 4):
        raise ValueError(f"parity model {parity.name!r}: the concat encoder needs k in (2, 4), got k={parity.k}")


def evaluate_base(base, manifests, groupings=4, seed=0, threads=1, data_root=None, ks=None):
    """The evaluation record of one base model (see the module docstring)."""
    coder_name, encode, decode = coding.serving_coder()
    X, y = datasplits.load_split(base.dataset, "test", base.split_seed, data_root)
    _, y_train = datasplits.load_split(base.dataset, "train", base.split_seed, data_root)
    outputs = Runner(base, threads)(X)
    record = {
        "dataset": base.dataset, "arch": base.arch, "base": base.name, "split_seed": base.split_seed,
        "n_test": int(len(y)), "groupings": groupings, "coder": coder_name,
        "base_top1": float((outputs.argmax(1) == y).mean()),
        "base_top5": float(degraded.topk_hits(outputs, y, 5).mean()),
        "default_top1": float((y == np.bincount(y_train).argmax()).mean()),
        "backup": None, "backup_arch": None, "backup_top1": None, "parity": [],
    }
    backups = [m for m in manifests if m.role == "backup" and m.base_model == base.name]
    if backups:
        backup = backups[0]
        record.update(backup=backup.name, backup_arch=backup.arch,
                      backup_top1=float((Runner(backup, threads)(X).argmax(1) == y).mean()))
    parities = [m for m in manifests if m.role == "parity" and m.base_model == base.name
                and (ks is None or m.k in ks)]
    if ks is not None:
        missing = sorted(set(ks) - {m.k for m in parities})
        if missing:
            raise ValueError(f"no parity model with k={missing[0]} for base {base.name!r}")
    for parity in sorted(parities, key=lambda m: (m.k, m.encoder)):
        _check_parity(base, parity)
        scores = degraded.score(X, y, outputs, parity.k, lambda q, e=parity.encoder: encode(e, q),
                                Runner(parity, threads), decode, groupings=groupings, seed=seed)
        record["parity"].append({"name": parity.name, "k": parity.k, "encoder": parity.encoder, **scores})
    return record


def evaluate_dir(directory, groupings=4, seed=0, threads=1, data_root=None, ks=None, base_name=None):
    """Evaluation records of every base model in ``directory`` (or only ``base_name``)."""
    manifests = load_manifests(directory)
    bases = [m for m in manifests if m.role == "base" and (base_name is None or m.name == base_name)]
    if not bases:
        raise ValueError(f"no base model {base_name!r} in {directory}")
    return [evaluate_base(b, manifests, groupings, seed, threads, data_root, ks) for b in bases]


def _pct(value):
    return "    -" if value is None else f"{100 * value:5.1f}"


def format_table(record):
    """A text table of one evaluation record: sum and concat side by side per k."""
    lines = [f"{record['dataset']} / {record['arch']}  ({record['base']}; test n={record['n_test']}, "
             f"{record['groupings']} groupings, coder {record['coder']})",
             f"  base top-1 {_pct(record['base_top1'])}%  top-5 {_pct(record['base_top5'])}%   "
             f"backup ({record['backup_arch'] or 'none'}) top-1 {_pct(record['backup_top1'])}%   "
             f"default output top-1 {_pct(record['default_top1'])}%",
             "                sum                        concat",
             "   k   top-1  top-5  agree      top-1  top-5  agree"]
    by_key = {(p["k"], p["encoder"]): p for p in record["parity"]}
    for k in sorted({p["k"] for p in record["parity"]}):
        cells = []
        for encoder in ("sum", "concat"):
            p = by_key.get((k, encoder))
            cells.append("  ".join(_pct(p and p[key]) for key in ("degraded_top1", "degraded_top5", "agreement")))
        lines.append(f"  {k:2d}   {cells[0]}      {cells[1]}")
    return "\n".join(lines)


def build_parser():
    parser = cli.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts",
                        help="directory of ONNX models and manifests (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    parser.add_argument("--base", default=None, help="evaluate only the base model of this name")
    parser.add_argument("--k", type=int, action="append", default=None,
                        help="evaluate only parity models with this k (repeatable)")
    parser.add_argument("--groupings", type=int, default=4,
                        help="seeded random groupings of the test split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the groupings (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default: %(default)s)")
    parser.add_argument("--data-root", default=None, help="directory of torchvision-format datasets")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.groupings < 1:
        raise ValueError(f"--groupings must be >= 1, got {args.groupings}")
    for k in args.k or ():
        if k < 2:
            raise ValueError(f"--k must be >= 2, got {k}")
    records = evaluate_dir(args.artifacts, args.groupings, args.seed, args.threads, args.data_root,
                           args.k, args.base)
    print("\n\n".join(format_table(r) for r in records))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], "python -m models.evaluate"))
