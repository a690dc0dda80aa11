"""Overload benchmark: three times the sustainable rate, then back down.

``python -m deploy.reliability.overload`` starts a local deployment (mode none,
``--num-models`` instances with a constant emulated compute time, so the
sustainable rate is ``num_models * 1000 / compute_ms`` queries/s at batch
size 1) whose frontend admits at most ``--max-in-system`` queries
(default: what the instances can finish in half the deadline), then sends
three phases of open-loop load from this process:

1. ``base``: ``--base-fraction`` of the sustainable rate;
2. ``overload``: ``--factor`` (3) times the sustainable rate;
3. ``recovery``: the base rate again.

It reports per phase the answers, errors by code, the latency of admitted
(answered) queries against the deadline, and the frontend's peak RSS
(sampled every 100 ms), and checks: RESOURCE_EXHAUSTED appears under
overload, every answered query came within its deadline, no query was lost,
and the recovery phase is answered in full from its first second on.
"""

import asyncio
import collections
import json
import pathlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from deploy.reliability.rig import add_rig_arguments, missing_models, rig_errors, run_spec, start_rig
from services.common import cli


@dataclass
class Phase:
    name: str
    rate: float
    sent: int = 0
    ok: int = 0
    errors: dict = field(default_factory=dict)
    lost: int = 0
    p50_ok_ms: float = float("nan")
    p99_ok_ms: float = float("nan")
    max_ok_ms: float = float("nan")
    late: int = 0
    ok_first_second: str = ""


def summarize(name, rate, records, deadline_s):
    """One ``Phase`` from loadgen records."""
    ph = Phase(name, rate, sent=len(records))
    ok = [r.latency_ms for r in records if r.ok]
    ph.ok = len(ok)
    ph.errors = dict(collections.Counter(r.status for r in records if not r.ok))
    ph.lost = sum(1 for r in records if r.status == "CANCELLED" or r.latency_ms > (deadline_s + 1) * 1e3)
    ph.late = sum(1 for v in ok if v > deadline_s * 1e3)
    if ok:
        ph.p50_ok_ms, ph.p99_ok_ms, ph.max_ok_ms = (float(np.percentile(ok, 50)), float(np.percentile(ok, 99)),
                                                    float(max(ok)))
    first = [r for r in records if r.send_time_s < 1.0]
    ph.ok_first_second = f"{sum(r.ok for r in first)}/{len(first)}"
    return ph


class RssSampler:
    """Samples a process's RSS every ``period_s`` on the event loop."""

    def __init__(self, pid, period_s=0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.period_s = period_s
        self.peak = 0
        self.samples = []
        self._task = None

    async def _run(self):
        while True:
            rss = self.proc.memory_info().rss
            self.samples.append(rss)
            self.peak = max(self.peak, rss)
            await asyncio.sleep(self.period_s)

    def start(self):
        self._task = asyncio.create_task(self._run())

    async def stop(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def run_phases(address, frontend_pid, phases, deadline_s, seed=0):
    """Runs ``phases`` [(name, rate, duration_s)]; returns ([Phase], rss sampler)."""
    from loadgen.runner import Spec, run_async

    sampler = RssSampler(frontend_pid)
    sampler.start()
    out = []
    try:
        for i, (name, rate, duration_s) in enumerate(phases):
            spec = Spec(target=address, rate=rate, duration_s=duration_s, deadline_s=deadline_s,
                        seed=seed + i, run_id=f"overload-{name}")
            result = await run_async(spec, channels=4)
            out.append(summarize(name, rate, result.records, deadline_s))
    finally:
        await sampler.stop()
    return out, sampler


def check(phases, deadline_s):
    """Problems found (empty = pass)."""
    by = {p.name: p for p in phases}
    problems = []
    if not by["overload"].errors.get("RESOURCE_EXHAUSTED"):
        problems.append("no RESOURCE_EXHAUSTED under overload")
    for p in phases:
        if p.lost:
            problems.append(f"{p.name}: {p.lost} queries lost")
        if p.late:
            problems.append(f"{p.name}: {p.late} answers after the deadline")
    rec = by["recovery"]
    if rec.ok != rec.sent:
        problems.append(f"recovery: {rec.sent - rec.ok} of {rec.sent} not answered ({rec.errors})")
    return problems


def format_table(phases, peak_rss, base_rss, deadline_s):
    lines = [f"{'phase':<10} {'rate/s':>7} {'sent':>6} {'ok':>6} {'errors':<34} {'lost':>4} "
             f"{'ok p50 ms':>9} {'ok p99 ms':>9} {'ok max ms':>9} {'1st s ok':>8}"]
    for p in phases:
        errs = " ".join(f"{k}={v}" for k, v in sorted(p.errors.items())) or "-"
        lines.append(f"{p.name:<10} {p.rate:>7.0f} {p.sent:>6} {p.ok:>6} {errs:<34} {p.lost:>4} "
                     f"{p.p50_ok_ms:>9.1f} {p.p99_ok_ms:>9.1f} {p.max_ok_ms:>9.1f} {p.ok_first_second:>8}")
    lines.append(f"deadline {deadline_s * 1e3:.0f} ms; frontend RSS before {base_rss / 2**20:.1f} MiB, "
                 f"peak {peak_rss / 2**20:.1f} MiB")
    return "\n".join(lines)


def run(artifacts, *, num_models=1, compute_ms=20.0, deadline_s=1.0, max_in_system=None, factor=3.0,
        base_fraction=0.8, base_s=5.0, overload_s=10.0, recovery_s=5.0, work_dir):
    """Starts the deployment, runs the phases; returns (phases, peak_rss, base_rss, sustainable)."""
    sustainable = num_models * 1000.0 / compute_ms
    if max_in_system is None:
        max_in_system = max(1, int(sustainable * deadline_s / 2))
    rig = start_rig(artifacts, run_spec(mode="none", num_models=num_models, compute_ms=compute_ms,
                                        deadline_s=deadline_s),
                    work_dir,
                    frontend_extra_args=["--max-in-system", str(max_in_system)])
    try:
        import psutil

        base_rss = psutil.Process(rig.dep.frontend.pid).memory_info().rss
        phases, sampler = cli.run_async(run_phases(
            rig.dep.frontend_address, rig.dep.frontend.pid,
            [("base", sustainable * base_fraction, base_s), ("overload", sustainable * factor, overload_s),
             ("recovery", sustainable * base_fraction, recovery_s)], deadline_s))
    finally:
        rig.stop()
    return phases, sampler.peak, base_rss, sustainable, max_in_system


PROG = "python -m deploy.reliability.overload"


def _main(argv):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_rig_arguments(p, num_models=1, compute_ms=20.0, deadline_s=1.0, out="results/overload")
    p.add_argument("--max-in-system", type=int, default=None,
                   help="frontend admission limit (default: sustainable rate x deadline / 2)")
    p.add_argument("--factor", type=float, default=3.0, help="overload = factor x sustainable rate")
    p.add_argument("--base-fraction", type=float, default=0.8, help="base/recovery rate / sustainable rate")
    p.add_argument("--base-s", type=float, default=5.0, help="length of the base phase, s")
    p.add_argument("--overload-s", type=float, default=10.0, help="length of the overload phase, s")
    p.add_argument("--recovery-s", type=float, default=5.0, help="length of the recovery phase, s")
    a = p.parse_args(argv)
    for flag in ("num_models", "compute_ms", "deadline_s", "factor", "base_fraction", "base_s", "overload_s",
                 "recovery_s"):
        if not getattr(a, flag) > 0:
            raise cli.UsageError(f"--{flag.replace('_', '-')} must be > 0")
    if missing_models(a.artifacts):
        raise cli.Failure(missing_models(a.artifacts))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    phases, peak, base, sustainable, limit = run(
        a.artifacts, num_models=a.num_models, compute_ms=a.compute_ms, deadline_s=a.deadline_s,
        max_in_system=a.max_in_system, factor=a.factor, base_fraction=a.base_fraction, base_s=a.base_s,
        overload_s=a.overload_s, recovery_s=a.recovery_s, work_dir=tempfile.mkdtemp(prefix="run-", dir=out))
    print(f"sustainable {sustainable:.0f} q/s ({a.num_models} x {a.compute_ms:g} ms); --max-in-system {limit}")
    print(format_table(phases, peak, base, a.deadline_s))
    problems = check(phases, a.deadline_s)
    (out / "overload.json").write_text(json.dumps({
        "sustainable_qps": sustainable, "max_in_system": limit, "peak_rss_bytes": peak, "base_rss_bytes": base,
        "phases": [asdict(ph) for ph in phases], "problems": problems}, indent=2))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=rig_errors())


if __name__ == "__main__":
    sys.exit(main())
