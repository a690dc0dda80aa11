"""``results/<experiment>/report.md``: tables and plots of a sweep.

Sections: the setting (config, network and its parameters, background
model), a comparison across modes at equal settings (medians, p99.9, and the
ratio of each mode's p99.9 and median to equal resources'), the plots
(latency CDF per mode at each rate, median and p99.9 against rate, accuracy
by source), and every run's tables in the original's format.
"""

import json
import math
import pathlib

from loadgen import plots, stats
from loadgen.records import read_csv


def write_report(root, sweep, results, network, twin=None):
    """Writes ``report.md`` (and PNGs) under ``root``; returns its path.

    ``twin``: optional ``(results, network, path)`` of the same sweep on the
    other network (the emulated model beside a testbed run), shown side by
    side with this one.
    """
    root = pathlib.Path(root)
    plot_dir = root / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys(r["run"].redundancy_mode for r in results))
    rows = comparison(results)
    lines = [f"# {sweep.experiment_id}", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    lines += [
        "## Setting", "",
        f"- config: `{sweep.source_path}`",
        f"- model: `{sweep.model}`, encoder `{sweep.encoder}`",
        f"- runs: {len(results)} (modes {', '.join(modes)}; {sweep.num_trials} trial(s) each)",
        f"- network: `{json.dumps(network, sort_keys=True)}`",
        f"- emulated compute per batch: `{json.dumps(sweep.compute, sort_keys=True)}`",
    ]
    if any(r["run"].background not in (0, "clipper") for r in results) and network.get("kind") == "emulated":
        lines.append(f"- emulated background model: `{json.dumps(sweep.background_model, sort_keys=True)}`")
    lines += ["", "## Comparison (latency in ms)", "", format_comparison(rows, modes), ""]
    lines += _targets(rows, modes)
    if twin is not None:
        lines += _side_by_side(rows, network, twin, modes, root)
    lines += ["## Plots", ""]
    for rate in sorted({r["run"].send_rate for r in results}):
        by_mode = {}
        for res in results:
            if res["run"].send_rate == rate:
                recs = read_csv(pathlib.Path(res["dir"]) / "records.csv")
                label = f"{res['run'].redundancy_mode} k={res['run'].k}" if len(sweep.ec_k_val) > 1 \
                    else res["run"].redundancy_mode
                by_mode.setdefault(label, []).extend(r.latency_ms for r in recs if r.ok and not r.warmup)
        name = f"latency_cdf_rate_{rate:g}.png"
        plots.plot_latency_cdf(by_mode, plot_dir / name, title=f"End-to-end latency at {rate:g} queries/s")
        lines.append(f"![latency CDF at {rate:g}/s](plots/{name})")
    points = [(r["run"].redundancy_mode, r["run"].send_rate, r["summary"]) for r in results]
    plots.plot_latency_vs_rate(points, plot_dir / "latency_vs_rate.png")
    lines.append("![median and p99.9 against rate](plots/latency_vs_rate.png)")
    for mode in modes:
        pooled = stats.summarize([rec for res in results if res["run"].redundancy_mode == mode
                                  for rec in read_csv(pathlib.Path(res["dir"]) / "records.csv")])
        name = f"accuracy_by_source_{mode}.png"
        plots.plot_accuracy_by_source(pooled, plot_dir / name, title=f"Top-1 accuracy by source ({mode})")
        lines.append(f"![accuracy by source, {mode}](plots/{name})")
    lines += ["", "## Runs", ""]
    for res in results:
        run = res["run"]
        lines += [f"### {run.name}", "", "```", stats.format_report(res["summary"])]
        if res.get("frontend_text"):
            lines += ["", res["frontend_text"]]
        lines += ["```", f"background: `{json.dumps(res['summary'].get('background'), sort_keys=True)}`", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (root / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    return path


def _targets(rows, modes):
    """The headline check: coded p99.9 vs equal resources, medians within 15%."""
    if not {"coded", "equal"} <= set(modes):
        return []
    out = ["### Coded vs equal resources", ""]
    for row in rows:
        tail, med = row.get("coded_vs_equal_p999"), row.get("coded_vs_equal_med")
        if tail is None or med is None:
            continue
        verdict = "meets" if tail <= 0.6 and abs(med - 1) <= 0.15 else "misses"
        out.append(f"- rate {row['rate']:g}/s, k={row['k']}: coded p99.9 = {tail:.2f} x equal, "
                   f"median = {med:.2f} x equal ({verdict} the target: p99.9 <= 0.6 x, medians within 15%)")
    return out + [""]


def _side_by_side(rows, network, twin, modes, root):
    """The same sweep on two networks: each one's comparison, then the ratios."""
    twin_results, twin_network, twin_dir = twin
    twin_rows = comparison(twin_results)
    rel = pathlib.Path(twin_dir).relative_to(root) if pathlib.Path(twin_dir).is_relative_to(root) else twin_dir
    here, there = network.get("kind", "?"), twin_network.get("kind", "?")
    out = [f"## The same sweep on the {there} network", "",
           f"Run right after this one, same config and seeds (`{rel}/`, its own report there); "
           f"network: `{json.dumps(twin_network, sort_keys=True)}`.", "",
           format_comparison(twin_rows, modes), ""]
    if not {"coded", "equal"} <= set(modes):
        return out
    key = lambda r: (r["queue_mode"], r["num_models"], r["k"], r["batch_size"], r["rate"], r["background"])
    other = {key(r): r for r in twin_rows}
    out += [f"### {here} vs {there}", "",
            f"| RATE | K | CODED/EQUAL P99.9 ({here}) | CODED/EQUAL P99.9 ({there}) "
            f"| CODED/EQUAL MED ({here}) | CODED/EQUAL MED ({there}) "
            f"| EQUAL P99.9 ({here}) | EQUAL P99.9 ({there}) |",
            "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o = other.get(key(row), {})
        out.append("| " + " | ".join([
            f"{row['rate']:g}", str(row["k"]),
            fmt(row.get("coded_vs_equal_p999"), 2), fmt(o.get("coded_vs_equal_p999"), 2),
            fmt(row.get("coded_vs_equal_med"), 2), fmt(o.get("coded_vs_equal_med"), 2),
            fmt(row.get("equal_p999"), 1), fmt(o.get("equal_p999"), 1)]) + " |")
    return out + [""]


def comparison(results):
    """Rows comparing modes at equal settings: medians, p99.9 and ratios."""
    keyed = {}
    for res in results:
        run = res["run"]
        key = (run.queue_mode, run.num_models, run.k, run.batch_size, run.send_rate, str(run.background),
               run.num_clients, run.num_queries)
        overall = res["summary"]["overall"]
        keyed.setdefault(key, {}).setdefault(run.redundancy_mode, []).append(overall)
    rows = []
    for key, modes in keyed.items():
        row = {"queue_mode": key[0], "num_models": key[1], "k": key[2], "batch_size": key[3],
               "rate": key[4], "background": key[5]}
        for mode, overalls in modes.items():
            row[f"{mode}_med"] = _mean([o["med"] for o in overalls])
            row[f"{mode}_p999"] = _mean([o["p999"] for o in overalls])
        for mode in modes:
            if mode != "equal" and "equal" in modes:
                row[f"{mode}_vs_equal_p999"] = _ratio(row[f"{mode}_p999"], row["equal_p999"])
                row[f"{mode}_vs_equal_med"] = _ratio(row[f"{mode}_med"], row["equal_med"])
        rows.append(row)
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def format_comparison(rows, modes):
    """The rows of ``comparison`` as a Markdown table (latency in ms)."""
    cols = ["rate", "k", "batch_size", "background"]
    header = ["RATE", "K", "BS", "BG"]
    for m in modes:
        header += [f"{m.upper()} MED", f"{m.upper()} P99.9"]
    others = [m for m in modes if m != "equal"]
    if "equal" in modes:
        header += [f"{m.upper()}/EQUAL P99.9" for m in others] + [f"{m.upper()}/EQUAL MED" for m in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['rate']:g}", str(row["k"]), str(row["batch_size"]), str(row["background"])]
        for m in modes:
            cells += [fmt(row.get(f"{m}_med")), fmt(row.get(f"{m}_p999"))]
        if "equal" in modes:
            cells += [fmt(row.get(f"{m}_vs_equal_p999"), 2) for m in others]
            cells += [fmt(row.get(f"{m}_vs_equal_med"), 2) for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value, digits=1):
    """``value`` with ``digits`` decimals, or ``-`` for None/NaN (table cells)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
