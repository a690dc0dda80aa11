"""``results/<experiment>/report.md``: tables and plots of a sweep.

Sections: the setting (config, network and its parameters, background
model), a comparison across modes at equal settings (medians, p99.9, and the
ratio of each mode's p99.9 and median to equal resources': the mean over
trials with the min-max beside it), the target check (met only when every
trial meets it), the decode policies side by side when the sweep has several,
where the tail comes from (``deploy.runner.tail``), the plots (latency CDF
per mode at each rate, median and p99.9 against rate, accuracy by source),
and every run's tables in the original's format.

A run's *mode label* is its redundancy mode, with its decode policy when the
config sets one (``coded/late``).
"""

import json
import math
import pathlib

from deploy.runner import tail
from loadgen import plots, stats
from loadgen.records import read_csv

#: The headline target (the paper's Figure 9): coded p99.9 at most this
#: times equal resources', medians within ``TARGET_MEDIAN`` of each other.
TARGET_P999 = 0.52
TARGET_MEDIAN = 0.10


def mode_label(run):
    """``coded``; ``coded/late`` when the run has a decode policy; ``coded/late/pad`` when it
    also names its partial-groups choice."""
    parts = [run.redundancy_mode, getattr(run, "decode_policy", None), getattr(run, "partial_groups", None)]
    return "/".join(p for p in parts if p)


def in_flight(run):
    """The run's calls in flight per instance when its config set it (``max_in_flight``), else None."""
    return getattr(run, "max_in_flight", None)


def run_label(run):
    """``mode_label`` and, when the config set it, the calls in flight per instance
    (``coded/late, 2 in flight``): what tells runs of one rate apart in the tail tables."""
    n = in_flight(run)
    return mode_label(run) + (f", {n} in flight" if n else "")


def write_report(root, sweep, results, network, twin=None):
    """Writes ``report.md`` (and PNGs) under ``root``; returns its path.

    ``twin``: optional ``(results, network, path)`` of the same sweep on the
    other network (the emulated model beside a testbed run), shown side by
    side with this one.
    """
    root = pathlib.Path(root)
    plot_dir = root / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys(mode_label(r["run"]) for r in results))
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
    lines += _decode_policies(results)
    lines += _tail_sources(results)
    lines += _machine_cpu(results)
    if twin is not None:
        lines += _side_by_side(rows, network, twin, modes, root)
    lines += ["## Plots", ""]
    for rate in sorted({r["run"].send_rate for r in results}):
        by_mode = {}
        for res in results:
            if res["run"].send_rate == rate:
                recs = read_csv(pathlib.Path(res["dir"]) / "records.csv")
                label = f"{run_label(res['run'])} k={res['run'].k}" if len(sweep.ec_k_val) > 1 \
                    else run_label(res["run"])
                by_mode.setdefault(label, []).extend(r.latency_ms for r in recs if r.ok and not r.warmup)
        name = f"latency_cdf_rate_{rate:g}.png"
        plots.plot_latency_cdf(by_mode, plot_dir / name, title=f"End-to-end latency at {rate:g} queries/s")
        lines.append(f"![latency CDF at {rate:g}/s](plots/{name})")
    points = [(run_label(r["run"]), r["run"].send_rate, r["summary"]) for r in results]
    plots.plot_latency_vs_rate(points, plot_dir / "latency_vs_rate.png")
    lines.append("![median and p99.9 against rate](plots/latency_vs_rate.png)")
    for mode in modes:
        pooled = stats.summarize([rec for res in results if mode_label(res["run"]) == mode
                                  for rec in read_csv(pathlib.Path(res["dir"]) / "records.csv")])
        name = f"accuracy_by_source_{mode.replace('/', '-')}.png"
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
    """The headline check, per trial: coded p99.9 <= 0.52 x equal's, medians within 10%;
    with more than one trial, also how many of all coded x equal trial pairings meet it."""
    coded = [m for m in modes if m.split("/")[0] == "coded"]
    if "equal" not in modes or not coded:
        return []
    out = ["### Coded vs equal resources", ""]
    paired = False
    for mode in coded:
        for row in rows:
            tails, meds = row.get(f"{mode}_vs_equal_p999_trials"), row.get(f"{mode}_vs_equal_med_trials")
            if not tails or not meds:
                continue
            every = all(meets_target(t, m) for t, m in zip(tails, meds))
            verdict = "meets" if every else "misses"
            flight = f", {row['max_in_flight']} in flight" if row.get("max_in_flight") else ""
            met, pairings = row.get(f"{mode}_vs_equal_pairs") or (0, 0)
            pairing = ""
            if pairings > len(tails):
                paired = True
                pairing = f"; {met} of all {pairings} pairings of a coded trial with an equal trial meet it"
            out.append(f"- {mode}, rate {row['rate']:g}/s, k={row['k']}{flight}: p99.9 = {_spread(row, mode, 'p999')} x "
                       f"equal, median = {_spread(row, mode, 'med')} x equal over {len(tails)} trial(s) "
                       f"({verdict} the target in {'every' if every else 'at least one'} trial: "
                       f"p99.9 <= {TARGET_P999} x, medians within {TARGET_MEDIAN:.0%}{pairing})")
    if paired:
        out += ["", "A run's p99.9 is set by its few slowest queries, so which trial is paired with which "
                    "moves the verdict; the share of all pairings estimates how often one trial meets the "
                    "target."]
    return out + [""]


def meets_target(p999_ratio, med_ratio):
    """The headline condition for one coded/equal pair of runs."""
    return (p999_ratio is not None and med_ratio is not None and p999_ratio <= TARGET_P999
            and abs(med_ratio - 1) <= TARGET_MEDIAN)


def _spread(row, mode, what):
    mean, lo, hi = (row.get(f"{mode}_vs_equal_{what}{s}") for s in ("", "_min", "_max"))
    if mean is None:
        return "-"
    return f"{mean:.2f}" if lo == hi else f"{mean:.2f} ({lo:.2f}-{hi:.2f})"


def _decode_policies(results):
    """Coded runs per variant (decode policy, partial groups), side by side: reconstructed
    share, top-1, tail. Only when the sweep has more than one coded variant."""
    variant = lambda run: "/".join(p for p in (mode_label(run).partition("/")[2],
                                               f"{in_flight(run)} in flight" if in_flight(run) else "") if p)
    policies = list(dict.fromkeys(variant(r["run"]) for r in results
                                  if r["run"].redundancy_mode == "coded" and variant(r["run"])))
    if len(policies) < 2:
        return []
    out = ["### Decode policies (coded runs; mean over trials)", "",
           "| RATE | K | POLICY | RECONSTRUCTED | TOP-1 (SERVED VS LABELS) | P50 | P99 | P99.9 |",
           "|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for res in results:
        run = res["run"]
        if run.redundancy_mode == "coded" and variant(run):
            keyed.setdefault((run.send_rate, run.k, variant(run)), []).append(res["summary"])
    for (rate, k, policy), summaries in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                             policies.index(kv[0][2]))):
        answered = sum(s["overall"]["num"] or 0 for s in summaries)
        recon = sum(s["by_source"].get("reconstructed", {}).get("num") or 0 for s in summaries)
        acc = [(s["overall"].get("accuracy"), s["overall"]["num"] or 0) for s in summaries]
        weight = sum(n for a, n in acc if a is not None)
        top1 = sum(a * n for a, n in acc if a is not None) / weight if weight else None
        out.append("| " + " | ".join([
            f"{rate:g}", str(k), policy, f"{100 * recon / answered:.1f}%" if answered else "-",
            fmt(top1, 4), fmt(_mean([s["overall"]["med"] for s in summaries])),
            fmt(_mean([s["overall"]["p99"] for s in summaries])),
            fmt(_mean([s["overall"]["p999"] for s in summaries]))]) + " |")
    return out + [""]


def _add_counts(table, key, counts):
    """Adds ``counts`` (cause -> n) into ``table[key]`` (created with every cause at 0)."""
    agg = table.setdefault(key, dict.fromkeys(tail.CAUSES + tail.FLAGS + tail.BASE_RATES, 0))
    for cause, n in counts.items():
        agg[cause] += n


def _tail_sources(results):
    """Causes of the slowest queries per mode, pooled over rates and trials, and for coded
    modes also per rate at p99.9 (``deploy.runner.tail``)."""
    rows = {}
    per_rate = {}
    for res in results:
        run = res["run"]
        path = pathlib.Path(res["dir"])
        if not (path / "records.csv").exists():
            continue
        records = read_csv(path / "records.csv")
        for pct in (99.9, 99.0):
            counts = tail.classify_run(records, path, run.redundancy_mode, pct)
            _add_counts(rows, (run_label(run), pct), counts)
            if pct == 99.9 and run.redundancy_mode == "coded":
                _add_counts(per_rate, (run_label(run), run.send_rate), counts)
    if not rows:
        return []
    table = [(f"{mode}, >= p{pct:g} of each run", counts) for (mode, pct), counts in rows.items()]
    if len({rate for _, rate in per_rate}) > 1:
        table += [(f"{mode} at {rate:g}/s, >= p99.9", counts) for (mode, rate), counts in sorted(per_rate.items())]
    return ["### Where the tail comes from", "",
            "Each query at or above its run's p99.9 (and p99) client latency, put in one cause from the "
            "frontend's per-query and per-group records (definitions in `deploy/runner/tail.py`); "
            f"`frontend_stalled` counts those, whatever their cause, during which the frontend's event "
            f"loop stalled for at least {tail.STALL_MS:g} ms (its `stalls.jsonl`); `frontend_cpu_wait` "
            f"those during which the frontend's threads waited for a CPU for at least "
            f"{tail.CPU_WAIT_MS:g} ms in total and {100 * tail.CPU_WAIT_SHARE:g}% of the query's time in it "
            "(the frontend shares its cores). After each flag's tail "
            "count, its rate among all measured queries of the same runs: a flag explains the tail only "
            "where the tail's rate is well above it.", "",
            tail.format_table(table), ""]


#: Above this share of time with some task waiting for a CPU, the report warns (%).
CPU_PRESSURE_WARN_PCT = 10.0


def _machine_cpu_cells(results):
    """{(rate, mode): (mean busy %, mean waiting %)} over trials, and the cores, from each
    run's ``summary["machine_cpu"]`` (runs without it are left out; None where unknown)."""
    cells = {}
    cores = None
    for res in results:
        cpu = res["summary"].get("machine_cpu")
        if not cpu:
            continue
        cores = cpu.get("cores") or cores
        cell = cells.setdefault((res["run"].send_rate, run_label(res["run"])), ([], []))
        if cpu.get("busy_pct") is not None:
            cell[0].append(cpu["busy_pct"])
        if cpu.get("pressure_pct") is not None:
            cell[1].append(cpu["pressure_pct"])
    return {key: (_mean(busy), _mean(waiting)) for key, (busy, waiting) in cells.items()}, cores


def cpu_contention(results):
    """``(waiting %, rate, mode)`` of the rate and mode whose runs most often had some task
    waiting for a CPU, when that is over ``CPU_PRESSURE_WARN_PCT``; else None."""
    cells, _ = _machine_cpu_cells(results)
    worst = max(((w, rate, mode) for (rate, mode), (_, w) in cells.items() if w is not None), default=None)
    return worst if worst is not None and worst[0] > CPU_PRESSURE_WARN_PCT else None


def _machine_cpu(results):
    """This machine's CPU during each mode's load, per rate (means over trials): how busy,
    and how often some task waited for a CPU (``summary["machine_cpu"]``, Linux PSI)."""
    cells, cores = _machine_cpu_cells(results)
    if not cells:
        return []
    lines = ["### This machine's CPU during the load", "",
             f"Means over trials. BUSY: share of all {cores or '?'} cores' time in use; WAITING: share of "
             "the time during which some task was ready to run but waited for a CPU (Linux PSI `some`, "
             "`-` without it). Every service of a local run shares these cores, so a query can be "
             "slow because another process had the CPU; the tail report's `frontend_cpu_wait` counts "
             "those queries.", "",
             "| RATE | MODE | BUSY | WAITING |", "|---|---|---|---|"]
    for (rate, mode), (busy, waiting) in sorted(cells.items()):
        lines.append(f"| {rate:g} | {mode} | {_pct(busy)} | {_pct(waiting)} |")
    lines.append("")
    worst = cpu_contention(results)
    if worst is not None:
        lines += [f"**The CPU was contended**: some task waited for a CPU {worst[0]:.1f}% of the time "
                  f"({worst[2]} at {worst[1]:g}/s). Latencies here measure this machine's CPU as well "
                  "as the system; more cores, or fewer services per core, would change them.", ""]
    return lines


def _pct(value):
    return f"{value:.1f}%" if value is not None else "-"


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
    if "equal" not in modes or not any(m.split("/")[0] == "coded" for m in modes):
        return out
    coded = next(m for m in modes if m.split("/")[0] == "coded")
    key = lambda r: (r["queue_mode"], r["num_models"], r["k"], r["batch_size"], r["rate"], r["background"],
                     r.get("max_in_flight"))
    other = {key(r): r for r in twin_rows}
    out += [f"### {here} vs {there}", "",
            f"| RATE | K | CODED/EQUAL P99.9 ({here}) | CODED/EQUAL P99.9 ({there}) "
            f"| CODED/EQUAL MED ({here}) | CODED/EQUAL MED ({there}) "
            f"| EQUAL P99.9 ({here}) | EQUAL P99.9 ({there}) | AGREE |",
            "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o = other.get(key(row), {})
        out.append("| " + " | ".join([
            f"{row['rate']:g}", str(row["k"]),
            fmt(row.get(f"{coded}_vs_equal_p999"), 2), fmt(o.get(f"{coded}_vs_equal_p999"), 2),
            fmt(row.get(f"{coded}_vs_equal_med"), 2), fmt(o.get(f"{coded}_vs_equal_med"), 2),
            fmt(row.get("equal_p999"), 1), fmt(o.get("equal_p999"), 1),
            _agree(row, o, coded)]) + " |")
    return out + ["", "AGREE: the calibration's acceptance, equal resources' p99.9 within 25 % of each other "
                      "and coded/equal p99.9 within 0.10 (means over trials).", ""]


def _agree(row, other, coded):
    eq, eq_other = row.get("equal_p999"), other.get("equal_p999")
    ratio, ratio_other = row.get(f"{coded}_vs_equal_p999"), other.get(f"{coded}_vs_equal_p999")
    if None in (eq, eq_other, ratio, ratio_other) or not eq:
        return "-"
    return "yes" if abs(eq_other - eq) <= 0.25 * eq and abs(ratio_other - ratio) <= 0.10 else "no"


def comparison(results):
    """Rows comparing modes at equal settings: medians, p99.9 (means over trials) and ratios.

    A ratio to equal resources is taken per trial (a trial's coded run
    against the same trial's equal run), then summarized: ``X_vs_equal_p999``
    is the mean over trials, ``_min``/``_max`` the spread and ``_trials`` the
    list in trial order. ``X_vs_equal_pairs`` is ``[met, pairings]``: of every
    coded trial paired with every equal trial at that setting, how many meet
    the headline target (``meets_target``).
    """
    keyed = {}
    for res in results:
        run = res["run"]
        key = (run.queue_mode, run.num_models, run.k, run.batch_size, run.send_rate, str(run.background),
               run.num_clients, run.num_queries, in_flight(run))
        overall = res["summary"]["overall"]
        keyed.setdefault(key, {}).setdefault(mode_label(run), {})[run.trial] = overall
    rows = []
    for key, modes in keyed.items():
        row = {"queue_mode": key[0], "num_models": key[1], "k": key[2], "batch_size": key[3],
               "rate": key[4], "background": key[5], "max_in_flight": key[8]}
        for mode, trials in modes.items():
            row[f"{mode}_med"] = _mean([o["med"] for o in trials.values()])
            row[f"{mode}_p999"] = _mean([o["p999"] for o in trials.values()])
        equal = modes.get("equal")
        for mode, trials in modes.items():
            if mode == "equal" or equal is None:
                continue
            for what in ("p999", "med"):
                ratios = [_ratio(trials[t][what], equal[t][what]) for t in sorted(trials) if t in equal]
                known = [r for r in ratios if r is not None]
                row[f"{mode}_vs_equal_{what}"] = _mean(known)
                row[f"{mode}_vs_equal_{what}_min"] = min(known) if known else None
                row[f"{mode}_vs_equal_{what}_max"] = max(known) if known else None
                row[f"{mode}_vs_equal_{what}_trials"] = ratios
            pairs = [meets_target(_ratio(c["p999"], e["p999"]), _ratio(c["med"], e["med"]))
                     for c in trials.values() for e in equal.values()]
            row[f"{mode}_vs_equal_pairs"] = [sum(pairs), len(pairs)]
        rows.append(row)
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def format_comparison(rows, modes):
    """The rows of ``comparison`` as a Markdown table (latency in ms)."""
    header = ["RATE", "K", "BS", "BG"]
    flight = any(row.get("max_in_flight") for row in rows)
    if flight:
        header.append("IN FLIGHT")
    for m in modes:
        header += [f"{m.upper()} MED", f"{m.upper()} P99.9"]
    others = [m for m in modes if m != "equal"]
    if "equal" in modes:
        header += [f"{m.upper()}/EQUAL P99.9" for m in others] + [f"{m.upper()}/EQUAL MED" for m in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['rate']:g}", str(row["k"]), str(row["batch_size"]), str(row["background"])]
        if flight:
            cells.append(str(row.get("max_in_flight") or "-"))
        for m in modes:
            cells += [fmt(row.get(f"{m}_med")), fmt(row.get(f"{m}_p999"))]
        if "equal" in modes:
            cells += [_spread(row, m, "p999") for m in others]
            cells += [_spread(row, m, "med") for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value, digits=1):
    """``value`` with ``digits`` decimals, or ``-`` for None/NaN (table cells)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
