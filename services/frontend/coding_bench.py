"""Frontend coded path, pinned buffers on vs off (``make bench``): allocations and CPU per coded query.

    python -m services.frontend.coding_bench [--json PATH] [--quick]

Two variants of the same frontend, side by side in one run:

- ``pool``: as it runs (``--coding-pool-buffers`` default): the parity
  inputs are encoded into a pinned pool buffer, serialised from it, and the
  buffer goes back when the group finishes; reconstructions likewise;
- ``alloc``: ``--coding-pool-buffers 0``: the kernels allocate (``out=None``),
  as the frontend did before the pool.

Each variant of each case is measured in its own fresh process (the
allocator's state, e.g. glibc's adaptive mmap threshold, otherwise favours
whichever variant runs second).

1. In process (``coding_ext.meter.measure_step``): the real ``Engine`` in coded
   mode (k, batch size, in-process ``LocalCoder``) over instant in-process
   instances that serialise every batch as the gRPC client does
   (``GrpcInstanceClient.prepare``) and answer with a linear model. One step is
   one coding group: k * batch_size queries submitted, every member but the
   first answers, the parity answers, the first member is reconstructed, then
   its original arrives late (scored against the reconstruction) and the group
   finishes. Per coded query: traced bytes at peak above the baseline (also as
   a multiple of one parity input's bytes), minor page faults, CPU us.
2. As processes at a fixed rate (skipped with ``--rate 0``): 2 data and 1
   parity model servers (a linear MatMul model of ``--input-size`` floats:
   its own parity model, so decodes are exact) and, per variant, a frontend
   process (``python -m services.frontend --mode coded``) under open-loop
   Poisson load at ``--rate`` q/s for ``--duration-s`` (the load generator of
   ``services.frontend.bench``); the frontend process's CPU (psutil) per
   query at the same rate for both variants, and the client's p50/p99.

The machine this is written on is shared: numbers measured there are not
results. Run on a quiet machine.
"""

import asyncio
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

from coding_ext.meter import measure_step, process_cpu_s
from services.common import cli
from services.common.manifest import Manifest
from services.common.procs import ServiceProcess
from services.common.clock import LoopClock
from services.frontend.coding import CodingPools, LocalCoder
from services.frontend.config import DEFAULT_CODING_POOL_BUFFERS
from services.frontend.engine import Engine
from services.frontend.instances import GrpcInstanceClient, InstanceClient
from services.frontend.queues import SingleQueue
from services.frontend.records import RECONSTRUCTED
from services.frontend.redundancy import Lateness, make_policy

VARIANTS = {"pool": DEFAULT_CODING_POOL_BUFFERS, "alloc": 0}    # name -> --coding-pool-buffers
CASES = [(784, 10, 1, 2), (3 * 224 * 224, 1000, 1, 2), (3 * 224 * 224, 1000, 4, 4)]  # in, out, batch, k
QUICK_CASES = [(784, 10, 1, 2), (3 * 32 * 32, 10, 2, 2)]


class _InstantClient(InstanceClient):
    """An in-process instance: serialises the batch as the gRPC client does, answers x[:, :out] * 0.5.

    The first member of every group answers only after ``LATE_TURNS`` loop turns, so it
    is reconstructed first and its original then arrives late.
    """

    LATE_TURNS = 4
    prepare = GrpcInstanceClient.prepare    # the transport's one serialisation (cached in batch.wire)
    out_size = 10
    k = 2

    def __init__(self, address):
        self.address = address

    async def infer(self, batch, timeout_s):
        self.prepare(batch)
        late = batch.role == "data" and batch.batch_id % (self.k + 1) == 0
        for _ in range(self.LATE_TURNS if late else 1):
            await asyncio.sleep(0)
        x = batch.inputs.reshape(len(batch.inputs), -1)
        return x[:, :self.out_size] * np.float32(0.5)


def _engine(in_size, out_size, batch_size, k, pool_buffers):
    client = type("Client", (_InstantClient,), {"out_size": out_size, "k": k})
    base = Manifest(name="bench", role="base", arch="linear", dataset="synthetic", split_seed=0, split={},
                    input_shape=(in_size,), input_dtype="float32", output_shape=(out_size,), onnx_file="-")
    pools = (CodingPools((batch_size, in_size), (batch_size, out_size), pool_buffers)
             if pool_buffers else None)
    policy = make_policy("coded", k=k, coder=LocalCoder("sum"), lateness=Lateness("immediate"), pools=pools)
    e = Engine(base=base, policy=policy, queue=SingleQueue(), clock=LoopClock(), client_factory=client,
               batch_size=batch_size, batch_timeout_s=1.0, group_timeout_s=10.0, gc_interval_s=0)
    for i in range(k):
        e.add_instance(f"d{i}", f"d{i}", "data")
    e.add_instance("p0", "p0", "parity")
    return e, pools


def in_process(cases, calls):
    """Meters one coding group per step, per case and variant, each in a fresh process
    (so that neither variant inherits the allocator state the other left); returns records."""
    import subprocess

    records = []
    for case in cases:
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, "-m", "services.frontend.coding_bench", "--one-case",
                                   ",".join(map(str, case)), "--one-variant", variant, "--calls", str(calls)],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"case {case} {variant}: {proc.stderr.strip()[-2000:]}")
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return records


def _one_case(case, variant, calls):
    """One case and variant metered in this process; returns its record."""
    records = []
    loop = asyncio.new_event_loop()
    try:
        for in_size, out_size, batch_size, k in [case]:
            rng = np.random.default_rng(0)
            xs = [rng.standard_normal(in_size).astype(np.float32) for _ in range(k * batch_size)]
            for variant, pool_buffers in [(variant, VARIANTS[variant])]:
                e, pools = loop.run_until_complete(_build(in_size, out_size, batch_size, k, pool_buffers))

                async def group():
                    qs = [e.submit(x) for x in xs]
                    answers = await asyncio.gather(*(q.future for q in qs))
                    while e.groups:
                        await asyncio.sleep(0)
                    return answers

                answers = loop.run_until_complete(group())
                reconstructed = sum(a.source == RECONSTRUCTED for a in answers)
                stats = measure_step(lambda: loop.run_until_complete(group()), calls=calls)
                queries = k * batch_size
                parity_bytes = batch_size * in_size * 4
                counters = e.counters
                records.append({
                    "variant": variant, "input_floats": in_size, "output_floats": out_size,
                    "batch_size": batch_size, "k": k, "queries_per_group": queries,
                    "reconstructed_per_group": reconstructed,
                    "peak_bytes_per_query": round(stats["peak_bytes"] / queries),
                    "peak_parity_inputs": round(stats["peak_bytes"] / parity_bytes, 2),
                    "minor_faults_per_query": stats["minor_faults"] / queries,
                    "cpu_us_per_query": round(stats["cpu_us"] / queries, 2),
                    "pool_misses": counters["coding_pool_misses"], "encodes": counters["encodes"],
                    "decodes": counters["decodes"], "step": stats})
                loop.run_until_complete(e.close())
                if pools is not None:
                    loop.run_until_complete(pools.close())
    finally:
        loop.close()
    return records[0]


async def _build(in_size, out_size, batch_size, k, pool_buffers):
    return _engine(in_size, out_size, batch_size, k, pool_buffers)


def at_rate(args, log=print):
    """Frontend process CPU per query at ``args.rate``, per variant; returns records."""
    from services.frontend.bench import run_load, write_trivial_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="parm-coding-bench-"))
    procs, records = [], []
    try:
        model = write_trivial_model(work, args.input_size, args.output_size, parity_k=2)
        parity = work / "trivial-parity.json"

        def server(manifest, role, name):
            p = ServiceProcess.python_module("services.model_server", [
                "--model", str(manifest), "--role", role, "--instance-id", name, "--port", "0",
                "--log-level", "WARNING"], name=name)
            procs.append(p)
            return p

        instances = [f"data={server(model, 'data', f'data-{i}').address}" for i in range(2)]
        instances.append(f"parity={server(parity, 'parity', 'parity-0').address}")
        for variant, pool_buffers in VARIANTS.items():
            frontend = ServiceProcess.python_module("services.frontend", [
                "--mode", "coded", "--model", str(model), "--parity-model", str(parity),
                "--decode-policy", "immediate", "--instances", ",".join(instances),
                "--coding-pool-buffers", str(pool_buffers), "--host", "127.0.0.1", "--port", "0",
                "--log-level", "WARNING"], name=f"frontend-{variant}")
            try:
                cpu0 = process_cpu_s(frontend.pid)
                run = run_load(frontend.address, args.rate, args.duration_s, seed=1,
                                input_size=args.input_size)
                cpu_s = process_cpu_s(frontend.pid) - cpu0
            finally:
                frontend.stop()
            sent = run.get("sent", 0) + 50          # the load generator's 50 warm-up queries count too
            rec = {"variant": variant, "rate": args.rate, "input_floats": args.input_size, **run,
                   "frontend_cpu_s": cpu_s, "frontend_cpu_us_per_query": 1e6 * cpu_s / max(1, sent)}
            records.append(rec)
            log(f"  {variant:<6} {args.rate:g} q/s: frontend CPU {rec['frontend_cpu_us_per_query']:.0f} us/query, "
                f"p50 {run.get('p50_ms') or float('nan'):.2f} ms, p99 {run.get('p99_ms') or float('nan'):.2f} ms, "
                f"errors {run.get('errors', run.get('error'))}")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    return records


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def _main(argv):
    p = cli.ArgumentParser(prog="python -m services.frontend.coding_bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--calls", type=int, default=500, help="metered coding groups per case and variant")
    p.add_argument("--rate", type=float, default=200.0, help="offered rate of the process part, q/s (0 = skip)")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of load per variant")
    p.add_argument("--input-size", type=int, default=3 * 224 * 224, help="floats per query (process part)")
    p.add_argument("--output-size", type=int, default=10,
                   help="floats per answer (process part; the model holds input x output weights)")
    p.add_argument("--quick", action="store_true",
                   help="small cases, few calls, 2 s of load of small queries (checks that it runs)")
    p.add_argument("--one-case", default=None, help=argparse_hidden())
    p.add_argument("--one-variant", choices=tuple(VARIANTS), default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    cli.setup_logging("WARNING")
    if args.one_case:           # (internal) one in-process measurement; prints its JSON record
        try:
            case = tuple(int(v) for v in args.one_case.split(","))
            in_size, out_size, batch_size, k = case
        except ValueError:
            raise cli.UsageError(f"--one-case: expected IN,OUT,BATCH,K, got {args.one_case!r}") from None
        print(json.dumps(_one_case(case, args.one_variant or "pool", args.calls)))
        return 0
    cases = CASES
    if args.quick:
        cases, args.calls, args.duration_s = QUICK_CASES, min(args.calls, 20), min(args.duration_s, 2.0)
        args.input_size, args.output_size, args.rate = 784, 10, min(args.rate, 50.0) if args.rate else 0.0
    print("== in process: one coding group per step (encode, serialise, decode, late original)")
    records = in_process(cases, args.calls)
    for r in records:
        print(f"  in {r['input_floats']:>6} out {r['output_floats']:>4} B {r['batch_size']} k {r['k']} "
              f"{r['variant']:<6} peak {r['peak_bytes_per_query']:>9} B/query "
              f"({r['peak_parity_inputs']:.2f} parity inputs per group), "
              f"faults {r['minor_faults_per_query']:.1f}/query, CPU {r['cpu_us_per_query']:.1f} us/query, "
              f"pool misses {r['pool_misses']}")
    out = {"in_process": records}
    if args.rate > 0:
        print(f"== as processes at {args.rate:g} q/s, {args.duration_s:g} s per variant")
        out["at_rate"] = at_rate(args)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": vars(args), **out}, indent=2))
        print(f"results written to {path}")
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m services.frontend.coding_bench",
                        runtime_errors=(OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
