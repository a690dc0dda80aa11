"""Plots of load-generator runs, as PNG (matplotlib, Agg backend).

- ``plot_latency_cdf``: one latency CDF per mode; the y axis is the tail
  ``1 / (1 - F)`` on a log scale, labelled as percentiles (50, 90, 99,
  99.9, ...), so the tail that matters is spread out.
- ``plot_latency_vs_rate``: median and p99.9 against the send rate, one line
  per mode (the shape of the paper's Figure 9).
- ``plot_accuracy_by_source``: top-1 accuracy of answered queries by source,
  with the count on each bar.

``python -m loadgen.plots RUN_DIR [RUN_DIR ...] --out DIR`` draws all three
from run directories written by ``python -m loadgen --out``. A run's mode is
``meta.redundancy_mode`` of its summary (from the frontend's GetStatus), or
``--label`` order when given; its rate is ``meta.spec.rate``.
"""

import json
import pathlib
import sys

import numpy as np

from loadgen.records import CSV_NAME, SOURCES, read_csv
from loadgen.stats import SUMMARY_NAME
from services.common import cli


# One colour per redundancy mode in every plot, so a mode reads the same
# across the CDF and the rate plot; other labels cycle through the rest.
MODE_COLORS = {"equal": "C0", "coded": "C1", "none": "C7", "cheap": "C2", "hedged": "C4"}


def mode_color(label, fallback_index=0):
    """The colour of a mode label (``"coded"``, ``"coded k=3"``, ...)."""
    return MODE_COLORS.get(str(label).split()[0], f"C{(fallback_index + 5) % 10}")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_latency_cdf(latencies_by_mode, path, title="End-to-end latency"):
    """Latency CDF with a log tail axis.

    Args:
        latencies_by_mode: dict mode -> sequence of latencies (ms).
        path: PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    max_tail = 10.0
    for mode, values in latencies_by_mode.items():
        v = np.sort(np.asarray(values, dtype=np.float64))
        if v.size == 0:
            continue
        # Empirical CDF at each sorted value: (i + 1) / (n + 1) keeps 1 - F > 0.
        f = np.arange(1, v.size + 1) / (v.size + 1)
        tail = 1.0 / (1.0 - f)
        max_tail = max(max_tail, tail[-1])
        ax.plot(v, tail, label=f"{mode} (n={v.size})", drawstyle="steps-post",
                color=mode_color(mode, len(ax.lines)))
    ax.set_yscale("log")
    ticks = [t for t in (2, 10, 100, 1000, 10000, 100000) if t <= max_tail * 1.01]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{100 * (1 - 1 / t):g}" for t in ticks])
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("percentile (log tail)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def plot_latency_vs_rate(points, path, title="Latency against send rate"):
    """Median and p99.9 against rate, one line per mode.

    Args:
        points: iterable of (mode, rate, summary) with ``summary`` as written
            to ``summary.json`` (its ``overall`` row is used).
        path: PNG to write.
    """
    plt = _pyplot()
    by_mode = {}
    for mode, rate, summary in points:
        by_mode.setdefault(mode, []).append((float(rate), summary["overall"]))
    fig, (ax_med, ax_tail) = plt.subplots(1, 2, figsize=(9, 4), sharex=True)
    for mode, items in sorted(by_mode.items()):
        items.sort(key=lambda item: item[0])
        rates = [r for r, _ in items]
        color = mode_color(mode, len(ax_med.lines))
        ax_med.plot(rates, [row["med"] for _, row in items], marker="o", label=mode, color=color)
        ax_tail.plot(rates, [row["p999"] for _, row in items], marker="o", label=mode, color=color)
    for ax, what in ((ax_med, "median"), (ax_tail, "p99.9")):
        ax.set_xlabel("send rate (queries/s)")
        ax.set_ylabel(f"{what} latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def plot_accuracy_by_source(summary, path, title="Top-1 accuracy by source"):
    """Bars of ``summary['by_source'][s]['accuracy']``, count on each bar."""
    plt = _pyplot()
    rows = summary["by_source"]
    names = [s for s in SOURCES if s in rows] + [s for s in rows if s not in SOURCES]
    acc = [rows[s]["accuracy"] if rows[s]["accuracy"] is not None else 0.0 for s in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, acc, color=["C0", "C1", "C2", "C3", "C4", "C5"][:len(names)])
    for bar, s in zip(bars, names):
        ax.annotate(f"n={rows[s]['num']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def plot_runs(run_dirs, out_dir, labels=None):
    """Draws the three plots for run directories; returns the PNG paths.

    ``latency_cdf.png`` (one curve per mode, runs of the same mode pooled at
    their highest rate), ``latency_vs_rate.png``, ``accuracy_by_source.png``
    (pooled over all runs).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, run_dir in enumerate(run_dirs):
        run_dir = pathlib.Path(run_dir)
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
        records = read_csv(run_dir / CSV_NAME)
        meta = summary.get("meta", {})
        mode = (labels[i] if labels else None) or meta.get("redundancy_mode") or run_dir.name
        rate = meta.get("spec", {}).get("rate", 0.0)
        runs.append((mode, rate, summary, records))
    top = {}
    for mode, rate, summary, records in runs:
        if mode not in top or rate > top[mode][0]:
            top[mode] = (rate, [r.latency_ms for r in records if r.ok and not r.warmup])
    cdf = plot_latency_cdf({m: v for m, (_, v) in top.items()}, out_dir / "latency_cdf.png")
    vs_rate = plot_latency_vs_rate([(m, r, s) for m, r, s, _ in runs], out_dir / "latency_vs_rate.png")
    from loadgen.stats import summarize
    pooled = summarize([r for *_, records in runs for r in records])
    acc = plot_accuracy_by_source(pooled, out_dir / "accuracy_by_source.png")
    return [cdf, vs_rate, acc]


PROG = "python -m loadgen.plots"


def _main(argv):
    parser = cli.ArgumentParser(prog=PROG, description="Plot load-generator runs as PNG.")
    parser.add_argument("run_dirs", nargs="+", help="directories written by `python -m loadgen --out`")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--label", action="append", default=None,
                        help="mode label per run dir, in order (default: the frontend's redundancy mode)")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.run_dirs):
        parser.error(f"{len(args.label)} --label for {len(args.run_dirs)} run dirs")
    try:
        paths = plot_runs(args.run_dirs, args.out, args.label)
    except (OSError, ValueError, KeyError) as exc:
        raise cli.Failure(str(exc)) from None
    for p in paths:
        print(p)
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
