"""Where the tail comes from: each slow query of a run, put in one cause.

Inputs are what a run already writes: the load generator's per-query records
(``records.csv``: client-side latency, source) and the frontend's
``queries.jsonl`` / ``groups.jsonl`` (docs/frontend.md), joined by
``request_id`` and ``group_id``. A query is in the tail of its run when its
client-side latency is at least the run's p99.9 (or p99, for a larger
sample). Its cause is the first of these that holds (``share`` = 0.5: the
cause took at least half of the query's latency):

- ``outside_frontend``: client latency minus the frontend's own e2e latency
  is at least half the latency (the client's and the frontend's links, the
  load generator);
- ``queued_at_frontend``: the batch's wait to form plus its wait for a free
  instance (``batch_wait_ms + queue_latency_ms``) is at least half of the
  frontend's e2e latency;
- ``reconstructed_waited_for_group``: answered by decoding, and its group
  was sealed (its k-th batch formed, so the parity could be encoded and
  sent) at least half of its e2e latency after the query arrived;
- ``reconstructed_held``: answered by decoding, and the decode policy held
  the reconstruction (``lateness_wait_ms``: it existed before the original
  was late) for at least half its e2e latency: the lateness threshold, not
  a slow input, set this query's latency;
- ``reconstructed_slow_sibling``: answered by decoding, and the last input
  of the decode to arrive was another data member (its instance was slow
  too); known from groups that record ``parity_answered_s`` and
  ``data_answered_s``;
- ``reconstructed_slow_parity``: answered by decoding, any other way: the
  parity was the last input to arrive (or, in records without those
  times, the parity or another member was slow);
- ``original_group_not_coded``: coded mode, answered by its original, in a
  group that never got a parity (partial and not padded, or not encoded);
- ``original_waited_for_group``: coded mode, answered by its original (its
  instance was slow), and its group was sealed at least half of its e2e
  latency after it arrived: the first members of a group wait for the
  last before any parity exists, which no decode can beat;
- ``double_straggler``: coded mode, answered by its original although its
  group had a parity in time: the parity or another member was as slow, so
  no decode came first;
- ``slow_instance``: a mode without coding, answered by a slow instance;
- ``no_frontend_record``: the frontend has no record of it (error, timeout).

Besides its cause, a tail query is counted as ``frontend_stalled`` (a flag,
not a cause: the count is beside the causes, not among them) when the
frontend's own process stalled for at least ``STALL_MS`` while the query was
in it: a ``loop`` line of the frontend's ``stalls.jsonl`` (its event loop ran
a timer that late) overlaps ``[received_s, answered_s]``. Such a query was
slowed by the frontend's process (a long callback, a garbage collection, the
process not being scheduled), whatever its cause says was last to arrive.

A second flag, ``frontend_cpu_wait``, counts the tail queries during which the
frontend's threads together waited for a CPU (runnable, not running) for at
least ``CPU_WAIT_MS`` and at least ``CPU_WAIT_SHARE`` of the query's time in
the frontend (the ``cpu`` lines of ``stalls.jsonl``, each interval's wait
counted in proportion to its overlap with ``[received_s, answered_s]``; the
share keeps a query that was slow for another reason, and so long enough to
collect a few ms of waiting anyway, from being flagged).
It is the frontend sharing its cores with other busy processes: on the
one-machine testbed, the model servers, the load generator, the shuffles and
the kernel's shaping.

A third flag, ``behind_shuffles``, counts the tail queries whose own call
ran on an instance that a background shuffle was moving data to or from
(``shuffles.jsonl`` of the run: each completed transfer's instances and
times, written by the runner), and, in coded mode, so did another call the
query's answer could have come from (a sibling's or the parity's): the
network slowed two members of the group at once, which a code with one
parity cannot hide. A call's interval is from its dispatch (the group's
formation when unknown) to its answer (the query's answer when it had none);
its instances are the ones its batch was sent to (``data_instances``,
``parity_instances`` of the group record; for an uncoded query, the instance
that answered). Transfers still in flight when the load ended are not in the
file.

Because some queries wait for a CPU, or run beside a shuffle, in any busy run,
each flag also has its rate among all measured queries of the same runs
(``all_<flag>`` of ``all``): a flag explains the tail only where its rate in
the tail is well above its rate among all queries.
"""

import bisect
import json
import math
import pathlib

CAUSES = (
    "outside_frontend", "queued_at_frontend", "reconstructed_waited_for_group", "reconstructed_held",
    "reconstructed_slow_sibling", "reconstructed_slow_parity",
    "original_group_not_coded", "original_waited_for_group", "double_straggler", "slow_instance",
    "no_frontend_record",
)
_SHARE = 0.5
#: A frontend event-loop stall at least this long marks the queries in flight (ms).
STALL_MS = 5.0
#: The frontend's threads waiting for a CPU at least this long in total marks a query (ms).
CPU_WAIT_MS = 5.0
#: ... and at least this share of the query's time in the frontend.
CPU_WAIT_SHARE = 0.25
FLAGS = ("frontend_stalled", "frontend_cpu_wait", "behind_shuffles")
#: The runner's record of a run's background transfers (see ``write_shuffles``).
SHUFFLES_FILE = "shuffles.jsonl"
#: Per flag, how many of all measured queries had it (``all_<flag>``), and how many there were.
BASE_RATES = tuple(f"all_{f}" for f in FLAGS) + ("all",)


def _jsonl(path):
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
        if isinstance(row, dict):
            out.append(row)
    return out


def load_frontend(run_dir):
    """(queries by request_id, groups by group_id) from ``run_dir/frontend``.

    A group record written before the frontend recorded ``sealed_s`` gets an
    estimate: the latest arrival of its queries if it is full (its k-th batch
    formed then, or at most a batch timeout later), else None.
    """
    d = pathlib.Path(run_dir) / "frontend"
    queries = {q["request_id"]: q for q in _jsonl(d / "queries.jsonl") if q.get("type") == "query"}
    groups = {g["group_id"]: g for g in _jsonl(d / "groups.jsonl") if g.get("type") == "group"}
    last = {}
    for q in queries.values():
        gid, received = q.get("group_id"), q.get("received_s")
        if gid is not None and received is not None:
            last[gid] = max(last.get(gid, received), received)
    for gid, g in groups.items():
        if "sealed_s" not in g:
            g["sealed_s"] = last.get(gid) if g.get("full") else None
    return queries, groups


def stall_rows(run_dir):
    """The lines of ``run_dir/frontend/stalls.jsonl`` (empty for runs recorded before it existed)."""
    return _jsonl(pathlib.Path(run_dir) / "frontend" / "stalls.jsonl")


def load_stalls(run_dir, min_ms=STALL_MS, rows=None):
    """The frontend's event-loop stalls of at least ``min_ms``: sorted [(start_s, end_s)]
    from ``run_dir``'s ``stalls.jsonl`` (or its ``rows``, already read)."""
    rows = stall_rows(run_dir) if rows is None else rows
    return sorted((row["start_s"], row["start_s"] + row["ms"] / 1e3) for row in rows
                  if row.get("kind") == "loop" and (row.get("ms") or 0) >= min_ms)


def stalled(query, stalls):
    """True if one of ``stalls`` overlaps the query's time in the frontend."""
    start, end = query.get("received_s"), query.get("answered_s")
    if start is None or end is None:
        return False
    return any(s0 < end and s1 > start for s0, s1 in stalls)


class CpuWaits:
    """The frontend's CPU-wait intervals of a run (``cpu`` lines of ``stalls.jsonl``, or of
    its ``rows``, already read), for summing the wait that overlaps a query (empty for runs
    recorded before them)."""

    def __init__(self, run_dir, rows=None):
        rows = stall_rows(run_dir) if rows is None else rows
        rows = sorted((row["start_s"], row["start_s"] + (row.get("span_ms") or 0) / 1e3, row["ms"])
                      for row in rows if row.get("kind") == "cpu")
        self.starts = [r[0] for r in rows]
        self.ends = [r[1] for r in rows]
        self.ms = [r[2] for r in rows]
        self.cum = [0.0]
        for ms in self.ms:
            self.cum.append(self.cum[-1] + ms)

    def _part(self, i, start, end):
        """The share of interval ``i``'s wait inside [start, end] (its wait spread evenly)."""
        s0, s1 = self.starts[i], self.ends[i]
        if s1 <= s0:
            return self.ms[i] if start <= s0 < end else 0.0
        return self.ms[i] * max(0.0, min(end, s1) - max(start, s0)) / (s1 - s0)

    def waited_ms(self, query):
        """How long the frontend's threads waited for a CPU while ``query`` was in it (ms)."""
        start, end = query.get("received_s"), query.get("answered_s")
        if start is None or end is None or not self.ms:
            return 0.0
        lo = bisect.bisect_right(self.ends, start)     # first interval ending after start
        hi = bisect.bisect_left(self.starts, end)      # first interval starting at or after end
        if hi <= lo:
            return 0.0
        total = self.cum[hi] - self.cum[lo]
        for i in {lo, hi - 1}:                          # edges: only their overlapping share
            total += self._part(i, start, end) - self.ms[i]
        return total


def cpu_bound(query, waits):
    """True if the frontend's threads waited for a CPU for at least ``CPU_WAIT_MS`` and
    ``CPU_WAIT_SHARE`` of the query's time in the frontend (``waits``: ``CpuWaits``)."""
    start, end = query.get("received_s"), query.get("answered_s")
    if start is None or end is None:
        return False
    return waits.waited_ms(query) >= max(CPU_WAIT_MS, CPU_WAIT_SHARE * (end - start) * 1e3)


def write_shuffles(path, spans):
    """Writes a run's transfers: ``spans`` of (source instance ids, destination instance ids,
    start_s, end_s), Unix times, one JSON line each."""
    with open(path, "w") as f:
        for src, dst, start, end in spans:
            f.write(json.dumps({"src": list(src), "dst": list(dst), "start_s": start, "end_s": end}) + "\n")


def load_shuffles(run_dir):
    """{instance id: sorted [(start_s, end_s)]} of the transfers touching it, from
    ``run_dir/shuffles.jsonl`` (empty for runs recorded before it, or without background)."""
    out = {}
    for row in _jsonl(pathlib.Path(run_dir) / SHUFFLES_FILE):
        for inst in (row.get("src") or []) + (row.get("dst") or []):
            out.setdefault(inst, []).append((row["start_s"], row["end_s"]))
    return {inst: sorted(spans) for inst, spans in out.items()}


def _shuffled(shuffles, instances, start, end):
    """True if a transfer touching one of ``instances`` overlaps [start, end]."""
    if start is None or end is None:
        return False
    return any(s0 < end and s1 > start for inst in instances for s0, s1 in shuffles.get(inst, ()))


def behind_shuffles(query, group, shuffles):
    """The ``behind_shuffles`` flag of one query (see the module doc)."""
    if not shuffles:
        return False
    end = query.get("answered_s")
    ids = (group or {}).get("data_batch_ids") or []
    members = (group or {}).get("data_instances")
    if members is None or query.get("batch_id") not in ids:
        # Uncoded (or a record without instances): the instance that answered.
        own = [query["instance_id"]] if query.get("instance_id") else []
        return _shuffled(shuffles, own, query.get("received_s"), end)
    formed = group.get("formed_s")
    dispatched = group.get("data_dispatched_s") or [None] * len(ids)
    answered = group.get("data_answered_s") or [None] * len(ids)
    calls = [(members[i], dispatched[i] or formed, answered[i] or end) for i in range(len(ids))]
    own = ids.index(query["batch_id"])
    if not _shuffled(shuffles, *calls[own]):
        return False
    others = [c for i, c in enumerate(calls) if i != own]
    if group.get("parity_instances"):
        others.append((group["parity_instances"], group.get("parity_dispatched_s") or formed,
                       group.get("parity_answered_s") or end))
    return any(_shuffled(shuffles, *c) for c in others)


def _waited_for_group(query, group, e2e):
    sealed = group.get("sealed_s") if group is not None else None
    return bool(e2e) and sealed is not None and (sealed - query["received_s"]) * 1e3 >= _SHARE * e2e


def _sibling_came_last(query, group):
    """True if another data member of ``query``'s group answered after the parity (so it,
    not the parity, was the last input of the decode). False when the group record has no
    such times (older records) or the parity came last."""
    if group is None:
        return False
    parity = group.get("parity_answered_s")
    answered = group.get("data_answered_s")
    ids = group.get("data_batch_ids") or []
    if parity is None or not answered or len(answered) != len(ids):
        return False
    others = [t for bid, t in zip(ids, answered) if bid != query.get("batch_id") and t is not None]
    return bool(others) and max(others) > parity


def cause(record, query, group, mode):
    """The cause (one of ``CAUSES``) of one slow query; see the module doc."""
    if query is None:
        return "no_frontend_record"
    e2e = query.get("e2e_latency_ms") or 0.0
    if record.latency_ms - e2e >= _SHARE * record.latency_ms:
        return "outside_frontend"
    waited = (query.get("batch_wait_ms") or 0.0) + (query.get("queue_latency_ms") or 0.0)
    if e2e and waited >= _SHARE * e2e:
        return "queued_at_frontend"
    source = (query.get("source") or "").upper()
    if source == "RECONSTRUCTED":
        if _waited_for_group(query, group, e2e):
            return "reconstructed_waited_for_group"
        if (query.get("lateness_wait_ms") or 0.0) >= _SHARE * e2e:
            return "reconstructed_held"
        if _sibling_came_last(query, group):
            return "reconstructed_slow_sibling"
        return "reconstructed_slow_parity"
    if mode != "coded":
        return "slow_instance"
    if group is None or not group.get("coded"):      # a padded partial group is coded
        return "original_group_not_coded"
    if _waited_for_group(query, group, e2e):
        return "original_waited_for_group"
    return "double_straggler"


def _percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else math.inf


def classify_run(records, run_dir, mode, percentile=99.9):
    """Counts of causes among the run's measured answered queries at or above its ``percentile``."""
    ok = [r for r in records if r.ok and not r.warmup]
    cut = _percentile([r.latency_ms for r in ok], percentile)
    queries, groups = load_frontend(run_dir)
    rows = stall_rows(run_dir)          # read once for both kinds
    stalls = load_stalls(run_dir, rows=rows)
    cpu = CpuWaits(run_dir, rows=rows)
    shuffles = load_shuffles(run_dir)
    counts = dict.fromkeys(CAUSES + FLAGS + BASE_RATES, 0)
    for r in ok:
        q = queries.get(r.request_id)
        flags = []
        if q is not None:
            if stalled(q, stalls):
                flags.append("frontend_stalled")
            if cpu_bound(q, cpu):
                flags.append("frontend_cpu_wait")
            if behind_shuffles(q, groups.get(q.get("group_id")), shuffles):
                flags.append("behind_shuffles")
        counts["all"] += 1
        for f in flags:
            counts[f"all_{f}"] += 1
        if r.latency_ms >= cut:
            g = groups.get(q.get("group_id")) if q is not None else None
            counts[cause(r, q, g, mode)] += 1
            for f in flags:
                counts[f] += 1
    return counts


def format_table(rows):
    """``rows``: [(label, counts dict)] -> a Markdown table of shares per cause."""
    used = [c for c in CAUSES if any(counts.get(c) for _, counts in rows)]
    flags = [f for f in FLAGS if any(counts.get(f) for _, counts in rows)]
    lines = ["| RUNS | TAIL QUERIES | " + " | ".join(used + [f"of them {f} (of all queries)" for f in flags])
             + " |", "|" + "---|" * (len(used) + len(flags) + 2)]
    for label, counts in rows:
        total = sum(counts.get(c, 0) for c in CAUSES)
        cells = [f"{counts.get(c, 0)} ({100 * counts.get(c, 0) / total:.0f}%)" if total else "0" for c in used]
        for f in flags:
            share = f"{100 * counts.get(f, 0) / total:.0f}%" if total else "-"
            base = f"{100 * counts.get(f'all_{f}', 0) / counts['all']:.0f}%" if counts.get("all") else "-"
            cells.append(f"{counts.get(f, 0)} ({share}) ({base})")
        lines.append(f"| {label} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
