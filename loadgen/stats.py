"""Latency statistics and the tables in the original's format.

Percentiles are numpy's default ``method="linear"`` (type 7 of Hyndman and
Fan): for sorted values ``v[0..n-1]`` the q-th percentile is the linear
interpolation at fractional rank ``(n - 1) * q / 100``. ``p995`` is the
99.5th percentile, ``p999`` the 99.9th. An empty sample gives ``None``.

The E2E table counts the measured (non-warm-up) queries that were answered
(status OK); errors are counted by status code beside it, and accuracy is the
fraction of answered queries whose predicted class equals the true label.

``python -m loadgen.stats RUN_DIR [--frontend-records DIR]`` prints the
tables of a run written with ``--out RUN_DIR`` and, given the frontend's
``--records-dir``, its encoding and decoding tables (microseconds).
"""

import csv
import json
import math
import pathlib
import sys
from collections import Counter

import numpy as np

from loadgen.records import CSV_NAME, SOURCES, read_csv
from services.common import cli

SUMMARY_NAME = "summary.json"
ROW_KEYS = ("num", "med", "mean", "p99", "p995", "p999")
_HEADERS = ("NUM", "MED", "MEAN", "P99", "P99.5", "P99.9")
# Column widths of the original's table (left-aligned, at least one space).
_WIDTHS = (6, 6, 6, 8, 8, 0)


def percentile(values, q):
    """The q-th percentile (0..100) by linear interpolation; None if empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    return float(np.percentile(values, q, method="linear"))


def latency_row(values):
    """``{num, med, mean, p99, p995, p999}`` of a sample (any unit)."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "num": int(values.size),
        "med": percentile(values, 50),
        "mean": float(values.mean()) if values.size else None,
        "p99": percentile(values, 99),
        "p995": percentile(values, 99.5),
        "p999": percentile(values, 99.9),
    }


def _fmt(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def format_table(title, row):
    """The original's table: title line, header line, one row of numbers.

    >>> print(format_table("E2E_LATENCY (ms)", latency_row([1.0, 2.0, 3.0])))
    E2E_LATENCY (ms)
    NUM   MED   MEAN  P99     P99.5   P99.9
    3     2.00  2.00  2.98    2.99    3.00
    """
    cells = [_fmt(row[k]) for k in ROW_KEYS]
    widths = [max(w, len(h) + 1, len(c) + 1) for w, h, c in zip(_WIDTHS, _HEADERS, cells)]
    widths[-1] = 0
    head = "".join(h.ljust(w) for h, w in zip(_HEADERS, widths))
    line = "".join(c.ljust(w) for c, w in zip(cells, widths))
    return f"{title}\n{head.rstrip()}\n{line.rstrip()}"


def _accuracy(records):
    if not records:
        return None
    return sum(1 for r in records if r.predicted == r.label) / len(records)


def summarize(records, meta=None):
    """The summary of a run (what ``summary.json`` holds).

    Args:
        records: iterable of ``loadgen.records.Record``.
        meta: optional dict stored as is under ``"meta"``.

    Returns:
        dict with ``overall`` (a latency row of answered measured queries, in
        ms, plus ``accuracy``), ``by_source`` (one such row per source in
        ``SOURCES``), ``shares`` (source -> fraction of the answered queries
        it served, None when none was answered), ``errors`` (status name -> count), ``send_lag_ms`` (a
        row over every measured query that was sent), counts and ``meta``.
    """
    records = list(records)
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    overall = latency_row([r.latency_ms for r in ok])
    overall["accuracy"] = _accuracy(ok)
    by_source = {}
    for source in SOURCES:
        group = [r for r in ok if r.source == source]
        row = latency_row([r.latency_ms for r in group])
        row["accuracy"] = _accuracy(group)
        by_source[source] = row
    others = sorted({r.source for r in ok} - set(SOURCES))
    for source in others:
        group = [r for r in ok if r.source == source]
        by_source[source] = {**latency_row([r.latency_ms for r in group]), "accuracy": _accuracy(group)}
    errors = Counter(r.status for r in measured if not r.ok)
    # What share of the answered queries each source served: with the top-1 of
    # the whole, the cost of a redundancy scheme in accuracy (issue 14).
    shares = {source: (row["num"] / len(ok) if ok else None) for source, row in by_source.items()}
    return {
        "units": "ms",
        "percentile_method": "numpy linear (type 7)",
        "num_sent": len(measured),
        "num_ok": len(ok),
        "num_warmup": len(records) - len(measured),
        "overall": overall,
        "by_source": by_source,
        "shares": shares,
        "errors": dict(sorted(errors.items())),
        "send_lag_ms": latency_row([r.send_lag_ms for r in measured]),
        "meta": dict(meta or {}),
    }


def format_report(summary):
    """The E2E table, the breakdown by source, errors and send lag, as text."""
    lines = [format_table("E2E_LATENCY (ms)", summary["overall"])]
    acc = summary["overall"].get("accuracy")
    lines.append(f"accuracy (top-1): {_fmt_acc(acc)}  answered {summary['num_ok']} of "
                 f"{summary['num_sent']} measured queries ({summary['num_warmup']} warm-up excluded)")
    lines.append("")
    lines.append("BY SOURCE (ms)")
    head = ("SOURCE", "NUM", "MED", "MEAN", "P99", "P99.5", "P99.9", "ACC")
    rows = [head]
    for source, row in summary["by_source"].items():
        rows.append((source, *(_fmt(row[k]) for k in ROW_KEYS), _fmt_acc(row.get("accuracy"))))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(head))]
    lines += ["".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    shares = summary.get("shares") or {}
    served = [f"{source} {share * 100:.1f} %" for source, share in shares.items()
              if share is not None and source not in ("unspecified", "default")]
    if served:
        lines.append("served by: " + ", ".join(served) + "  (share of answered queries)")
    lines.append("")
    if summary["errors"]:
        lines.append("ERRORS (by status code)")
        lines += [f"{code:<22}{count}" for code, count in summary["errors"].items()]
    else:
        lines.append("ERRORS: none")
    lag = summary["send_lag_ms"]
    lines.append(f"send lag (ms): med {_fmt(lag['med'])}  p99 {_fmt(lag['p99'])}  "
                 f"p99.9 {_fmt(lag['p999'])}  (how late sends were against the Poisson schedule)")
    return "\n".join(lines)


def _fmt_acc(acc):
    return "-" if acc is None else f"{acc:.4f}"


def write_summary(summary, path):
    path = pathlib.Path(path)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def write_run(records, out_dir, meta=None):
    """Writes ``records.csv`` and ``summary.json`` into ``out_dir``; returns
    the summary (what ``python -m loadgen --out`` does)."""
    from loadgen.records import write_csv
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(records)
    summary = summarize(records, meta)
    write_csv(records, out_dir / CSV_NAME)
    write_summary(summary, out_dir / SUMMARY_NAME)
    return summary


# ---------------------------------------------------------------------------
# The frontend's records (services/frontend, --records-dir): an adapter.
# ---------------------------------------------------------------------------

_UNIT_TO_US = (("_us", 1.0), ("_ns", 1e-3), ("_ms", 1e3), ("_s", 1e6))


def _duration_us(row, stems):
    """The first ``<stem>[_latency]<unit>`` key of ``row`` with a value, in us."""
    for stem in stems:
        for middle in ("_latency", "_time", ""):
            for unit, factor in _UNIT_TO_US:
                value = row.get(f"{stem}{middle}{unit}")
                if value not in (None, ""):
                    return float(value) * factor
    return None


def _iter_rows(path):
    path = pathlib.Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            yield from csv.DictReader(f)
        return
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from json.loads(text)
        return
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


def load_frontend_records(path):
    """Reads the frontend's per-query and per-group records, tolerantly.

    ``path`` is the frontend's ``--records-dir`` (every ``*.jsonl``,
    ``*.json`` and ``*.csv`` in it: ``queries.jsonl`` and ``groups.jsonl``,
    see docs/frontend.md) or one such file. A row's kind is its ``type``
    field when it has one (``query``, ``group``; ``late_original`` and other
    kinds are skipped); otherwise a row with an encode or decode duration is
    a group record and a row with a latency a query record. Durations are
    found by name, ``<stem>[_latency|_time]<unit>`` with unit ``_us``,
    ``_ns``, ``_ms`` or ``_s`` (stems ``encode``/``encoding``,
    ``decode``/``decoding``, ``e2e``/``latency``/``frontend_latency``), and
    converted to microseconds.

    Returns:
        (queries, groups): lists of dicts. Query: ``request_id``,
        ``latency_us``, ``status`` ("OK" when absent), ``source`` (lower
        case), ``batch_id``, ``group_id``. Group: ``group_id``,
        ``encode_us`` and ``decode_us`` (None when absent, e.g. a group that
        needed no decoding), ``missing`` (the reconstructed member or None),
        ``full`` (False for a group sealed partial, None when not recorded).
    """
    path = pathlib.Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".csv")) \
        if path.is_dir() else [path]
    queries, groups = [], []
    for file in files:
        for row in _iter_rows(file):
            if not isinstance(row, dict):
                continue
            kind = row.get("type") or row.get("kind")
            enc = _duration_us(row, ("encode", "encoding"))
            dec = _duration_us(row, ("decode", "decoding"))
            if kind == "group" or (kind is None and (enc is not None or dec is not None)):
                missing = row.get("missing_index", row.get("missing", row.get("missing_member")))
                full = row.get("full")
                if isinstance(full, str):
                    full = {"true": True, "false": False}.get(full.strip().lower())
                groups.append({
                    "group_id": row.get("group_id"),
                    "encode_us": enc,
                    "decode_us": dec,
                    "missing": None if missing in ("", None) else missing,
                    "full": full,
                    "padded": row.get("padded") in (True, "true", "True"),
                })
                continue
            if kind not in (None, "query"):
                continue
            lat = _duration_us(row, ("e2e", "latency", "frontend_latency"))
            if lat is not None:
                queries.append({
                    "request_id": row.get("request_id"),
                    "latency_us": lat,
                    "status": str(row.get("status") or "OK"),
                    "source": str(row.get("source", "")).lower(),
                    "batch_id": row.get("batch_id"),
                    "group_id": row.get("group_id"),
                })
    return queries, groups


def partial_groups(groups):
    """``{num, sealed_partial, padded, share}`` of coding groups: how many were sealed
    with fewer than k batches, and how many of those got a padded parity (the
    others are unprotected); None share without groups."""
    known = [g for g in groups if g.get("full") is not None]
    partial = [g for g in known if g["full"] is False]
    return {"num": len(known), "sealed_partial": len(partial),
            "padded": sum(1 for g in partial if g.get("padded")),
            "share": len(partial) / len(known) if known else None}


def frontend_summary(queries, groups):
    """Latency rows of the frontend's records: ``frontend_latency_ms``
    (answered queries), ``encoding_latency_us`` (groups with an encoding
    duration), ``decoding_latency_us`` (groups that were decoded); and
    ``groups`` (``partial_groups``)."""
    return {
        "frontend_latency_ms": latency_row([q["latency_us"] / 1e3 for q in queries if q["status"] == "OK"]),
        "encoding_latency_us": latency_row([g["encode_us"] for g in groups if g["encode_us"] is not None]),
        "decoding_latency_us": latency_row([g["decode_us"] for g in groups if g["decode_us"] is not None]),
        "groups": partial_groups(groups),
    }


_FRONTEND_TITLES = (("frontend_latency_ms", "FRONTEND_LATENCY (ms)"),
                    ("encoding_latency_us", "ENCODING_LATENCY (us)"),
                    ("decoding_latency_us", "DECODING_LATENCY (us)"))


def frontend_tables(queries, groups):
    """Text of the frontend's latency (ms) and coding (us) tables, from
    ``frontend_summary``; empty tables are left out."""
    rows = frontend_summary(queries, groups)
    parts = [format_table(title, rows[key]) for key, title in _FRONTEND_TITLES if rows[key]["num"]]
    g = rows["groups"]
    if g["num"]:
        parts.append(f"GROUPS SEALED PARTIAL (fewer than k batches): {g['sealed_partial']} of {g['num']} "
                     f"({g['share'] * 100:.1f} %); padded (parity over zero members): {g['padded']}, "
                     f"unprotected: {g['sealed_partial'] - g['padded']}")
    return "\n\n".join(parts)


PROG = "python -m loadgen.stats"


def _main(argv):
    parser = cli.ArgumentParser(prog=PROG, description="Print the tables of a load-generator run.")
    parser.add_argument("run_dir", help=f"a directory written by --out (holds {CSV_NAME})")
    parser.add_argument("--frontend-records", default=None,
                        help="the frontend's --records-dir (adds encoding/decoding tables)")
    parser.add_argument("--write-summary", action="store_true",
                        help=f"(re)write {SUMMARY_NAME} from {CSV_NAME} (with a 'frontend' section "
                             "when --frontend-records is given)")
    args = parser.parse_args(argv)
    run_dir = pathlib.Path(args.run_dir)
    csv_path = run_dir / CSV_NAME if run_dir.is_dir() else run_dir
    try:
        records = read_csv(csv_path)
    except (OSError, KeyError, ValueError) as exc:
        raise cli.Failure(f"cannot read records from {csv_path}: {exc}") from None
    meta = {}
    summary_path = csv_path.parent / SUMMARY_NAME
    if summary_path.exists():
        try:
            meta = json.loads(summary_path.read_text()).get("meta", {})
        except (OSError, ValueError):
            meta = {}
    summary = summarize(records, meta)
    text = ""
    if args.frontend_records:
        try:
            queries, groups = load_frontend_records(args.frontend_records)
        except (OSError, ValueError) as exc:
            raise cli.Failure(f"cannot read frontend records {args.frontend_records}: {exc}") from None
        summary["frontend"] = frontend_summary(queries, groups)
        text = frontend_tables(queries, groups)
    if args.write_summary:
        write_summary(summary, summary_path)
    print(format_report(summary))
    if text:
        print()
        print(text)
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
