"""The spread of the default recipe over training seeds.

    python -m models.seeds --seeds 0 1 2 --out results/models-seeds

Builds the default artifact set once per seed (``models.build`` with
``--seed N``, into ``OUT/seed-N``; a seed whose directory is up to date is not
rebuilt, so ``make models``' own ``artifacts/`` can be copied in as seed 0),
then reports, on the fixed test split, the base model's top-1 and every parity
model's degraded-mode top-1 and its gap to the base of the same seed, as mean
and range (min..max) over the seeds. Writes ``OUT/summary.json`` and prints
the table that docs/models.md quotes.
"""

import json
import pathlib
import statistics
import sys

import torch

from models import build, cli


def summarize(indexes):
    """Rows of {"model", "k", "encoder", "values", "gaps"} over the ``indexes`` of one build per seed.

    ``values`` are test top-1 (base, backup) or degraded top-1 (parity), one
    per seed; ``gaps`` the degraded top-1 minus the base top-1 of the same
    seed (None for the base and the backup).
    """
    records = [index["evaluation"][0] for index in indexes]
    rows = [{"model": "base", "k": None, "encoder": None, "values": [r["base_top1"] for r in records],
             "gaps": None}]
    codes = [(p["k"], p["encoder"]) for p in records[0]["parity"]]
    for k, encoder in sorted(codes, key=lambda code: (code[1], code[0])):
        values, gaps = [], []
        for r in records:
            (p,) = [p for p in r["parity"] if (p["k"], p["encoder"]) == (k, encoder)]
            values.append(p["degraded_top1"])
            gaps.append(p["degraded_top1"] - r["base_top1"])
        rows.append({"model": f"parity k={k} {encoder}", "k": k, "encoder": encoder, "values": values,
                     "gaps": gaps})
    if all(r["backup"] for r in records):
        rows.append({"model": "backup", "k": None, "encoder": None, "values": [r["backup_top1"] for r in records],
                     "gaps": None})
    return rows


def _spread(values, scale=100.0):
    values = [v * scale for v in values]
    return f"{statistics.fmean(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def format_table(rows, seeds):
    """A markdown table: per model, top-1 and gap to the base as mean (min..max) in percent."""
    lines = [f"| model | top-1 %, mean (min..max) over seeds {', '.join(map(str, seeds))} | "
             "minus base, points | per seed |",
             "|---|---|---|---|"]
    for row in rows:
        gap = _spread(row["gaps"]) if row["gaps"] is not None else "-"
        per_seed = " / ".join(f"{100 * v:.1f}" for v in row["values"])
        lines.append(f"| {row['model']} | {_spread(row['values'])} | {gap} | {per_seed} |")
    return "\n".join(lines)


def build_parser():
    parser = cli.ArgumentParser(prog="python -m models.seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds, one build each (default: 0 1 2)")
    parser.add_argument("--out", default="results/models-seeds",
                        help="directory of the builds (OUT/seed-N) and of summary.json (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=cli.default_threads(),
                        help="processes training the parity and backup models of each build (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="the tiny plan (for tests; inaccurate models)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    torch.set_num_threads(1)
    out = pathlib.Path(args.out)
    plan = build.TINY if args.tiny else build.DEFAULT
    indexes = []
    for seed in args.seeds:
        indexes.append(build.build(out / f"seed-{seed}", build.with_seed(plan, seed), progress=not args.no_progress,
                                   threads=1, jobs=args.jobs))
    rows = summarize(indexes)
    summary = {"seeds": args.seeds, "rows": rows,
               "build_keys": [index["build_key"] for index in indexes],
               "build_s": [index["timing_s"]["total"] for index in indexes]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(rows, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], "python -m models.seeds"))
