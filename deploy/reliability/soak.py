"""Soak benchmark: a steady rate for a long time; nothing may grow.

``python -m deploy.reliability.soak --duration-s 1800`` starts a local coded deployment
(k = 2, ``--num-models`` data instances plus parity, emulated compute),
sends ``--rate`` queries/s open-loop from this process, and every
``--sample-s`` seconds records, for the frontend and every instance, RSS
and open file descriptors, and from the frontend's ``GetStatus`` the
queries in the system, the unfinished coding groups and the live asyncio
tasks. After ``--warmup-s`` it checks:

- RSS growth (last sample against the first after warm-up) under
  ``--max-rss-growth`` (5 %) for every process;
- open file descriptors: no growth;
- unfinished groups, tasks and queries in the system: no growth beyond
  their warm-up maximum (they move with the load; a leak climbs);
- every query answered (errors are counted, and fail the run).

Prints a table per sample and a verdict; writes ``soak.json``.
"""

import asyncio
import json
import pathlib
import sys
import tempfile
import time

import psutil

from deploy.reliability.rig import add_rig_arguments, frontend_status, missing_models, rig_errors, run_spec, start_rig
from services.common import cli


def _proc_sample(pid):
    p = psutil.Process(pid)
    return {"rss": p.memory_info().rss, "fds": p.num_fds()}


async def _sample(rig):
    st = await frontend_status(rig.dep.frontend_address)
    procs = {"frontend": _proc_sample(rig.dep.frontend.pid)}
    for role, s in rig.dep.instances:
        procs[s.name.rsplit("-", 2)[-2] + "-" + s.name.rsplit("-", 1)[-1]] = _proc_sample(s.pid)
    return {"procs": procs, "in_system": int(st.counters["in_system"]),
            "open_groups": int(st.counters["open_groups"]), "tasks": int(st.counters["asyncio_tasks"]),
            "answered": int(st.counters["answered"])}


def verdict(samples, warmup_s, max_rss_growth):
    """Problems found in ``samples`` [(t_s, sample)] (empty = pass)."""
    steady = [s for t, s in samples if t >= warmup_s]
    warm = [s for t, s in samples if t < warmup_s] or steady[:1]
    if len(steady) < 2:
        return ["fewer than two samples after warm-up"]
    first, last = steady[0], steady[-1]
    problems = []
    for name, p0 in first["procs"].items():
        p1 = last["procs"][name]
        growth = (p1["rss"] - p0["rss"]) / p0["rss"]
        if growth > max_rss_growth:
            problems.append(f"{name}: RSS grew {growth:.1%} ({p0['rss'] >> 20} -> {p1['rss'] >> 20} MiB)")
        if p1["fds"] > p0["fds"]:
            problems.append(f"{name}: open fds grew {p0['fds']} -> {p1['fds']}")
    for key in ("open_groups", "tasks", "in_system"):
        bound = max(s[key] for s in warm + steady[:1])
        tail = [s[key] for s in steady[len(steady) // 2:]]
        if min(tail) > bound:
            problems.append(f"{key}: never back under its warm-up maximum {bound} (min {min(tail)} later)")
    return problems


async def soak(rig, rate, duration_s, sample_s, deadline_s, on_sample):
    from loadgen.runner import Spec, run_async

    spec = Spec(target=rig.dep.frontend_address, rate=rate, duration_s=duration_s, deadline_s=deadline_s,
                run_id="soak")
    t0 = time.monotonic()
    load = asyncio.create_task(run_async(spec, channels=2))
    samples = []
    try:
        while not load.done():
            await asyncio.wait({load}, timeout=sample_s)
            if load.done():
                break
            t = time.monotonic() - t0
            s = await _sample(rig)
            samples.append((t, s))
            on_sample(t, s)
        result = await load
    finally:
        if not load.done():
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
    return samples, result.records


PROG = "python -m deploy.reliability.soak"


def _main(argv):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_rig_arguments(p, num_models=2, compute_ms=5.0, deadline_s=5.0, out="results/soak")
    p.add_argument("--duration-s", type=float, default=1800.0, help="length of the soak, s")
    p.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are warm-up")
    p.add_argument("--sample-s", type=float, default=10.0, help="sampling period, s")
    p.add_argument("--rate", type=float, default=40.0, help="queries/s")
    p.add_argument("--max-rss-growth", type=float, default=0.05,
                   help="largest accepted RSS growth after the warm-up, a fraction")
    a = p.parse_args(argv)
    if a.duration_s <= a.warmup_s + 2 * a.sample_s:
        raise cli.UsageError("--duration-s must exceed --warmup-s by at least two samples")
    if missing_models(a.artifacts):
        raise cli.Failure(missing_models(a.artifacts))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rig = start_rig(a.artifacts, run_spec(num_models=a.num_models, compute_ms=a.compute_ms, deadline_s=a.deadline_s),
                    tempfile.mkdtemp(prefix="run-", dir=out))

    def show(t, s):
        procs = "  ".join(f"{n} {v['rss'] / 2**20:.1f}M/{v['fds']}fd" for n, v in s["procs"].items())
        print(f"{t:7.0f}s answered {s['answered']:>7} in_system {s['in_system']:>3} groups {s['open_groups']:>3} "
              f"tasks {s['tasks']:>3}  {procs}", flush=True)

    try:
        samples, records = cli.run_async(soak(rig, a.rate, a.duration_s, a.sample_s, a.deadline_s, show))
    finally:
        rig.stop()
    problems = verdict(samples, a.warmup_s, a.max_rss_growth)
    errors = sum(1 for r in records if not r.ok)
    if errors:
        problems.append(f"{errors} of {len(records)} queries failed")
    print(f"{len(records)} queries, {errors} errors, {len(samples)} samples; "
          f"{'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}")
    (out / "soak.json").write_text(json.dumps({"args": vars(a), "queries": len(records), "errors": errors,
                                               "samples": [{"t_s": t, **s} for t, s in samples],
                                               "problems": problems}, indent=2))
    return 1 if problems else 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=rig_errors())


if __name__ == "__main__":
    sys.exit(main())
