"""``make chaos``: fault scenarios against a local coded deployment under load.

Each scenario starts a fresh local deployment (``deploy.runner.deployment``; coded
mode, k = 2, ``--num-models`` data instances plus N/k parity instances,
emulated compute), puts steady open-loop load on it in process
(``loadgen.run_async``, per-query deadline ``--deadline-s``), injects one
fault ``--warmup-s`` seconds in, heals it (where it can be healed) after
``--fault-s`` seconds, keeps the load on for ``--after-s`` seconds, and
checks:

- every query got an answer or an explicit gRPC error before its deadline
  (plus ``GRACE_S``): a query with no record, one the generator had to
  cancel, or one answered later than that is *lost* (must be 0);
- no request id was answered twice (loadgen records; *duplicated*);
- serving resumes: every query sent in the last ``--after-s`` / 2 seconds
  is answered OK.

Scenarios (``--scenarios``, comma-separated, default all):

| name | fault | healed by |
|---|---|---|
| kill-data | ``kill -9`` of data instance 0 | nothing (the rest serve) |
| kill-parity | ``kill -9`` of the first parity instance | nothing |
| kill-two | ``kill -9`` of data 0 and the parity of its group | nothing |
| hang | data 0 accepts and never answers (``SetPerturbation hang``) | clearing it |
| registry | the registry stopped for ``--registry-outage-s`` | restart, same port |
| coder | the coder service (``--coder``) ``kill -9`` | nothing |
| frontend | the frontend ``kill -9`` and restarted on its port | the restart |

The table printed per scenario: queries sent, answered by source, errors by
code, lost, duplicated, p99.9 latency of the queries sent during the fault,
whether serving resumed, and a note (what the frontend did).
"""

import abc
import argparse
import asyncio
import collections
import json
import logging
import pathlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from deploy.reliability.rig import (add_rig_arguments, frontend_status, missing_models, rig_errors, run_spec,
                                    secret_env, set_hang, start_rig)
from services.common import cli
from services.common.polls import PollTimeout, poll_until
from services.common.registry import PASSWORD_ENV, split_password

log = logging.getLogger(__name__)

SCENARIOS = ("kill-data", "kill-parity", "kill-two", "hang", "registry", "coder", "frontend")
GRACE_S = 1.0
RECOVERY_S = 1.0


# --- faults -------------------------------------------------------------------


class Fault(abc.ABC):
    """inject() at the fault time, heal() after ``fault_s``; ``notes`` for the table."""

    #: extra load time after the fault for the heal itself (a restart)
    heal_s = 0.0

    def __init__(self, rig, args):
        self.rig = rig
        self.args = args
        self.notes = []

    @abc.abstractmethod
    async def inject(self):
        """Starts the fault."""

    async def heal(self):
        pass

    async def after(self):
        """Checks once the load is over (e.g. that membership changes are seen)."""


class KillData(Fault):
    async def inject(self):
        await asyncio.to_thread(self.rig.instance("data", 0).kill)


class KillParity(Fault):
    async def inject(self):
        await asyncio.to_thread(self.rig.instance("parity", 0).kill)


class KillTwo(Fault):
    async def inject(self):
        # data 0 and the parity instance: with single_queue every group may
        # have a batch on both, so groups lose 2 of k+1 and are re-dispatched.
        await asyncio.to_thread(self.rig.instance("data", 0).kill)
        await asyncio.to_thread(self.rig.instance("parity", 0).kill)


class Hang(Fault):
    async def inject(self):
        await set_hang(self.rig.instance("data", 0).address, True)

    async def heal(self):
        await set_hang(self.rig.instance("data", 0).address, False)


class RegistryOutage(Fault):
    heal_s = 2.0

    async def inject(self):
        reg = self.rig.dep.registry
        self.port = int(reg.address.rsplit(":", 1)[1])
        self.password = self.rig.dep.registry_url.split("://:", 1)[1].split("@", 1)[0]
        await asyncio.to_thread(reg.stop, 2.0)

    async def heal(self):
        launcher = self.rig.launcher
        self.rig.dep.registry = await asyncio.to_thread(
            launcher.start, "services.common.registry", ["serve", "--host", launcher.bind_address(0)],
            name="chaos-registry-restarted", log_path=self.rig.log_dir / "registry-restarted.log", port=self.port,
            env={PASSWORD_ENV: self.password})

    async def after(self):
        # A change after the restart must reach the frontend: a new instance joins.
        from services.common.registry import redact_url

        dep, launcher = self.rig.dep, self.rig.launcher
        public_url, password = split_password(dep.registry_url)
        before = len((await frontend_status(dep.frontend_address)).instances)
        extra = await asyncio.to_thread(
            launcher.start, "services.model_server",
            ["--model", self.rig.models.base, "--role", "data", "--host", launcher.bind_address(0),
             "--instance-id", "data-joined", "--registry-url", public_url, "--deployment", dep.namespace,
             *(self.rig.tls.argv() if self.rig.tls else [])],
            name="chaos-data-joined", log_path=self.rig.log_dir / "data-joined.log", env={PASSWORD_ENV: password})
        dep.instances.append(("data", extra))

        async def joined():
            st = await frontend_status(dep.frontend_address)
            return True if any(i.instance_id == "data-joined" and i.healthy for i in st.instances) else None

        try:
            ok = await poll_until(joined, 15.0, what="the joined instance")
        except PollTimeout:
            ok = False
        self.notes.append(f"join after restart seen: {'yes' if ok else 'NO'} ({before} -> {before + 1})")
        self.joined_seen = ok
        log.info("registry %s restarted", redact_url(dep.registry_url))


class CoderKill(Fault):
    async def inject(self):
        await asyncio.to_thread(self.rig.coder.kill)


class FrontendRestart(Fault):
    heal_s = 5.0

    async def inject(self):
        self.port = int(self.rig.dep.frontend.address.rsplit(":", 1)[1])
        await asyncio.to_thread(self.rig.dep.frontend.kill)

    async def heal(self):
        launcher = self.rig.launcher
        self.rig.dep.frontend = await asyncio.to_thread(
            launcher.start, "services.frontend", self.rig.frontend_args, name="chaos-frontend-restarted",
            log_path=self.rig.log_dir / "frontend-restarted.log", port=self.port, env=secret_env(self.rig))


FAULTS = {"kill-data": KillData, "kill-parity": KillParity, "kill-two": KillTwo, "hang": Hang,
          "registry": RegistryOutage, "coder": CoderKill, "frontend": FrontendRestart}


# --- one scenario -------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    sent: int = 0
    answered: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    p999_fault_ms: float = float("nan")
    resumed: bool = False
    notes: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)

    @property
    def passed(self):
        return self.lost == 0 and self.duplicated == 0 and self.resumed


def analyse(name, records, deadline_s, fault_window, after_from_s):
    """Builds the ``Outcome`` of one scenario from loadgen records."""
    out = Outcome(name)
    measured = [r for r in records if not r.warmup]
    out.sent = len(measured)
    out.answered = dict(collections.Counter(r.source for r in measured if r.ok))
    out.errors = dict(collections.Counter(r.status for r in measured if not r.ok))
    out.lost = sum(1 for r in measured
                   if r.status == "CANCELLED" or r.latency_ms > (deadline_s + GRACE_S) * 1e3)
    ids = collections.Counter(r.request_id for r in records)
    out.duplicated = sum(c - 1 for c in ids.values() if c > 1)
    during = [r.latency_ms for r in measured if fault_window[0] <= r.send_time_s < fault_window[1]]
    if during:
        out.p999_fault_ms = float(np.percentile(during, 99.9))
    tail = [r for r in measured if r.send_time_s >= after_from_s]
    out.resumed = bool(tail) and all(r.ok for r in tail)
    return out


async def run_scenario(name, rig, args):
    """Loads ``rig`` for warmup + fault + after seconds, injecting ``name``'s fault."""
    from loadgen.runner import Spec, run_async

    fault = FAULTS[name](rig, args)
    total_s = args.warmup_s + args.fault_s + fault.heal_s + args.after_s
    spec = Spec(target=rig.dep.frontend_address, rate=args.rate, duration_s=total_s, warmup_queries=0,
                seed=args.seed, deadline_s=args.deadline_s, run_id=f"chaos-{name}")
    t0 = time.monotonic()
    load = asyncio.create_task(run_async(spec))
    injected_at = healed_at = None
    try:
        await asyncio.sleep(args.warmup_s)
        injected_at = time.monotonic() - t0
        await fault.inject()
        await asyncio.sleep(max(0.0, args.fault_s - (time.monotonic() - t0 - injected_at)))
        await fault.heal()
        healed_at = time.monotonic() - t0
        result = await load
    finally:
        if not load.done():
            load.cancel()
            await asyncio.wait({load})  # cancelled: nothing to retrieve
    await fault.after()
    # serving must be back within RECOVERY_S of the heal, and stay back
    after_from = max(healed_at + RECOVERY_S, total_s - args.after_s / 2)
    out = analyse(name, result.records, args.deadline_s, (injected_at, injected_at + args.fault_s), after_from)
    ok_after = [r.send_time_s for r in result.records if r.ok and r.send_time_s >= healed_at]
    if ok_after:
        out.notes.append(f"first answer {min(ok_after) - healed_at:.2f} s after the heal")
    out.notes = fault.notes + out.notes
    if getattr(fault, "joined_seen", True) is False:
        out.resumed = False
    try:
        st = await frontend_status(rig.dep.frontend_address)
    except grpc.aio.AioRpcError as exc:  # the table still shows the rest
        out.notes.append(f"no counters: {exc.code().name}")
    else:
        out.counters = {k: int(v) for k, v in st.counters.items()
                        if k in ("reconstructions", "redispatches", "encode_errors", "decode_errors", "coder_fallbacks",
                                 "encodes", "decodes",
                                 "call_errors", "call_timeouts", "instances_left", "rejected_unavailable")}
    out.notes += _explain(name, out)
    return out


def _explain(name, out):
    c = out.counters
    notes = []
    if name == "coder":
        if c.get("coder_fallbacks"):
            notes.append(f"fell back to in-process coding for {c['coder_fallbacks']} encodes/decodes "
                         f"(of {c.get('encodes', 0)}/{c.get('decodes', 0)}); encode/decode errors "
                         f"{c.get('encode_errors', 0)}/{c.get('decode_errors', 0)}")
        else:
            notes.append(f"no in-process fallback: encode/decode errors {c.get('encode_errors', 0)}/"
                         f"{c.get('decode_errors', 0)} leave groups uncoded; queries served by originals "
                         f"(re-dispatch on instance failure)")
    if name == "frontend":
        notes.append(f"clients saw UNAVAILABLE x{out.errors.get('UNAVAILABLE', 0)} while it was down")
    if c.get("reconstructions") or c.get("redispatches"):
        notes.append(f"reconstructions {c.get('reconstructions', 0)}, re-dispatches {c.get('redispatches', 0)}")
    return notes


async def run_plan(artifacts, plan):
    """Runs ``plan``, a list of ``(name, args, work_dir)``, one fresh rig per scenario."""
    outcomes = []
    for name, args, work_dir in plan:
        spec = run_spec(num_models=args.num_models, k=args.k, compute_ms=args.compute_ms,
                        deadline_s=args.deadline_s)
        rig = await asyncio.to_thread(start_rig, artifacts, spec, work_dir, with_coder=(name == "coder"))
        try:
            out = await run_scenario(name, rig, args)
        finally:
            await asyncio.to_thread(rig.stop)
        outcomes.append(out)
        print(format_row(out), flush=True)
    return outcomes


def run_scenarios(artifacts, names, args, work_dir):
    """Runs the scenarios ``names`` with the same ``args`` (work dirs under ``work_dir``)."""
    return cli.run_async(run_plan(artifacts, [(name, args, pathlib.Path(work_dir) / name) for name in names]))


# --- table ----------------------------------------------------------------------


def _fmt_counts(d):
    return " ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


HEADER = f"{'scenario':<12} {'sent':>5}  {'answered by source':<30} {'errors by code':<28} " \
         f"{'lost':>4} {'dup':>3} {'p99.9 fault ms':>14} resumed"


def format_row(o):
    return (f"{o.scenario:<12} {o.sent:>5}  {_fmt_counts(o.answered):<30} {_fmt_counts(o.errors):<28} "
            f"{o.lost:>4} {o.duplicated:>3} {o.p999_fault_ms:>14.1f} {'yes' if o.resumed else 'NO'}")


def format_table(outcomes):
    lines = [HEADER] + [format_row(o) for o in outcomes]
    notes = [f"  {o.scenario}: {n}" for o in outcomes for n in o.notes]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


PROG = "python -m deploy.reliability.chaos"


def parse_args(argv):
    """The flags; raises ``cli.UsageError`` (one line) on a mistake."""
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_rig_arguments(p, num_models=2, compute_ms=5.0, deadline_s=5.0, out="results/chaos")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    p.add_argument("--k", type=int, default=2, help="coding group size (parity instances: num_models / k)")
    p.add_argument("--rate", type=float, default=30.0, help="queries/s")
    p.add_argument("--warmup-s", type=float, default=3.0, help="load before the fault, s")
    p.add_argument("--fault-s", type=float, default=6.0, help="fault length (registry: see --registry-outage-s), s")
    p.add_argument("--registry-outage-s", type=float, default=30.0, help="registry outage, s")
    p.add_argument("--after-s", type=float, default=6.0, help="load after healing, s")
    p.add_argument("--seed", type=int, default=0, help="seed of the load's arrivals")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.scenarios.split(",") if n.strip()]
    bad = [n for n in names if n not in SCENARIOS]
    if bad or not names:
        p.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    for flag in ("rate", "deadline_s", "fault_s", "after_s", "registry_outage_s"):
        if getattr(a, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if a.num_models < a.k or a.k < 2:
        p.error("need k >= 2 and --num-models >= k")
    a.scenarios = names
    return a


def _main(argv):
    args = parse_args(argv)
    cli.setup_logging("WARNING")
    if missing_models(args.artifacts):
        raise cli.Failure(missing_models(args.artifacts))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    plan = []
    for name in args.scenarios:
        fault_s = args.registry_outage_s if name == "registry" else args.fault_s
        plan.append((name, argparse.Namespace(**{**vars(args), "fault_s": fault_s}),
                     tempfile.mkdtemp(prefix=f"{name}-", dir=out)))
    outcomes = cli.run_async(run_plan(args.artifacts, plan))
    print()
    print(format_table(outcomes))
    (out / "chaos.json").write_text(json.dumps([{**asdict(o), "passed": o.passed} for o in outcomes], indent=2))
    failed = [o.scenario for o in outcomes if not o.passed]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=rig_errors())


if __name__ == "__main__":
    sys.exit(main())
