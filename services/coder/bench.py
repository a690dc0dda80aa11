"""Coder benchmark (``make bench``): allocations and CPU per coded call, pooled vs out=None.

    python -m services.coder.bench [--json PATH] [--calls N] [--rate R] [--duration-s D] [--quick]

Two variants of the same service, compared side by side:

- ``pool``: the coder as it runs (``CoderCore`` defaults): each kernel writes
  into a buffer leased from its ``OutputPool``, the servicer serialises the
  reply from it, the lease ends with the executor job;
- ``alloc``: ``pool_buffers=0``, the kernels allocate their output
  (``out=None``), as the coder did before the pool.

1. In process, per case (batch shape, k): ``--calls`` Encode and ``--calls``
   Decode calls through ``CoderServicer`` on one event loop (request parsed
   once; per call: kernel in the executor, reply built), metered by
   ``coding_ext.meter.measure_step``: traced bytes at peak above the baseline
   (also as a multiple of one output's bytes), minor page faults, CPU us.
2. As a process at a fixed rate (skipped with ``--rate 0``): for each variant
   a server process (the ``serve`` subcommand: the same server factory,
   servicer and core as ``python -m services.coder``), open-loop Poisson
   Encode+Decode pairs at ``--rate`` pairs/s for ``--duration-s``; the
   server's CPU (psutil) per pair, at the same rate for both variants, and
   the client-side median latency.

The machine this is written on is shared: numbers measured there are not
results. Run on a quiet machine.
"""

import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from coding_ext import load_kernels
from coding_ext.meter import measure_step, process_cpu_s
from parm.v1 import coder_pb2 as pb
from parm.v1 import coder_pb2_grpc as pb_grpc
from services.coder.core import CoderCore
from services.coder.servicer import SERVICE_NAME, CoderServicer
from services.common import cli, tensors

CASES = [((1, 784), 2), ((1, 3, 224, 224), 2), ((8, 3, 224, 224), 4)]
QUICK_CASES = [((1, 784), 2), ((1, 3, 32, 32), 2)]
VARIANTS = {"pool": None, "alloc": 0}  # name -> pool_buffers (None: one per worker)


def _requests(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(k)]
    enc = pb.EncodeRequest(encoder="sum", inputs=[tensors.to_proto(x) for x in xs])
    parity = np.sum(xs, axis=0, dtype=np.float32)
    dec = pb.DecodeRequest(parity_output=tensors.to_proto(parity),
                           available_outputs=[tensors.to_proto(x) for x in xs[1:]])
    return enc, dec


def in_process(cases, calls):
    """Meters Encode and Decode through the servicer, per case and variant; returns records."""
    records = []
    loop = asyncio.new_event_loop()
    try:
        for shape, k in cases:
            enc, dec = _requests(shape, k)
            out_bytes = int(np.prod(shape)) * 4
            for variant, pool_buffers in VARIANTS.items():
                core = CoderCore(load_kernels("native"), workers=1, pool_buffers=pool_buffers)
                servicer = CoderServicer(core)
                for op, call in (("encode", lambda: servicer.Encode(enc, None)),
                                 ("decode", lambda: servicer.Decode(dec, None))):
                    stats = measure_step(lambda: loop.run_until_complete(call()), calls=calls)
                    records.append({"op": op, "k": k, "shape": list(shape), "variant": variant,
                                    "out_bytes": out_bytes,
                                    "peak_outputs": round(stats["peak_bytes"] / out_bytes, 2), **stats})
                core.close()
    finally:
        loop.close()
    return records


async def _drive(address, shape, k, rate, duration_s, seed):
    """Open-loop Poisson Encode+Decode pairs; returns (pairs sent, latencies in ms, errors)."""
    from services.common.server import insecure_channel

    enc, dec = _requests(shape, k)
    rng = np.random.default_rng(seed)
    latencies, errors, tasks = [], [], []
    async with insecure_channel(address) as channel:
        stub = pb_grpc.CoderStub(channel)
        await stub.Encode(enc, timeout=10)  # warm the channel

        async def pair():
            t0 = time.perf_counter()
            try:
                await stub.Encode(enc, timeout=10)
                await stub.Decode(dec, timeout=10)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                errors.append(repr(exc))
                return
            latencies.append((time.perf_counter() - t0) * 1e3)

        start = time.perf_counter()
        next_s = 0.0
        while next_s < duration_s:
            delay = start + next_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(pair()))
            next_s += rng.exponential(1.0 / rate)
        await asyncio.gather(*tasks)
    return len(tasks), latencies, errors


def at_rate(shape, k, rate, duration_s):
    """Server CPU per Encode+Decode pair at the same rate, per variant; returns records."""
    records = []
    for variant, pool_buffers in VARIANTS.items():
        with tempfile.TemporaryDirectory(prefix="parm-coder-bench-") as tmp:
            ready = pathlib.Path(tmp) / "ready.json"
            argv = [sys.executable, "-m", "services.coder.bench", "serve", "--ready-file", str(ready)]
            if pool_buffers is not None:
                argv += ["--pool-buffers", str(pool_buffers)]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 60
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"bench coder did not start: {proc.stderr.read().decode()[-2000:]}")
                    time.sleep(0.05)
                port = json.loads(ready.read_text())["port"]
                cpu0 = process_cpu_s(proc.pid)
                sent, latencies, errors = asyncio.run(_drive(f"127.0.0.1:{port}", shape, k, rate,
                                                             duration_s, seed=1))
                cpu_s = process_cpu_s(proc.pid) - cpu0
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                proc.stderr.close()
        records.append({"variant": variant, "shape": list(shape), "k": k, "rate": rate,
                        "duration_s": duration_s, "pairs": sent, "errors": len(errors),
                        "server_cpu_ms_per_pair": round(cpu_s * 1e3 / max(sent, 1), 3),
                        "p50_ms": round(statistics.median(latencies), 3) if latencies else None})
    return records


async def _serve(ready_file, pool_buffers):
    from services.common.procs import write_ready_file
    from services.common.server import create_server, run_until_signal

    core = CoderCore(load_kernels("native"), workers=1, pool_buffers=pool_buffers)
    built = create_server("127.0.0.1:0", [(pb_grpc.add_CoderServicer_to_server, CoderServicer(core),
                                           SERVICE_NAME)])
    await built.server.start()
    await built.set_serving(True)
    write_ready_file(ready_file, built.port)

    async def shutdown():
        core.close()

    await run_until_signal(built, grace_s=1.0, on_shutdown=shutdown)


def format_tables(in_proc, rated):
    head = (f"{'op':<7} {'k':>2} {'shape':<18} {'variant':<6} {'peak bytes':>11} {'x output':>8} "
            f"{'faults':>6} {'cpu us':>9}")
    lines = ["per call, in process (medians)", head, "-" * len(head)]
    for r in in_proc:
        lines.append(f"{r['op']:<7} {r['k']:>2} {str(tuple(r['shape'])):<18} {r['variant']:<6} "
                     f"{r['peak_bytes']:>11} {r['peak_outputs']:>8.2f} {r['minor_faults']:>6.0f} "
                     f"{r['cpu_us']:>9.1f}")
    if rated:
        head = f"{'variant':<7} {'shape':<18} {'k':>2} {'rate/s':>7} {'pairs':>6} {'errors':>6} " \
               f"{'server cpu ms/pair':>18} {'p50 ms':>7}"
        lines += ["", "coder process at a fixed rate (Encode+Decode pairs)", head, "-" * len(head)]
        for r in rated:
            lines.append(f"{r['variant']:<7} {str(tuple(r['shape'])):<18} {r['k']:>2} {r['rate']:>7g} "
                         f"{r['pairs']:>6} {r['errors']:>6} {r['server_cpu_ms_per_pair']:>18.3f} "
                         f"{r['p50_ms'] if r['p50_ms'] is not None else '-':>7}")
    return "\n".join(lines)


def _main(argv):
    if argv[:1] == ["serve"]:
        p = cli.ArgumentParser(prog="python -m services.coder.bench serve")
        p.add_argument("--ready-file", required=True)
        p.add_argument("--pool-buffers", type=int, default=None)
        a = p.parse_args(argv[1:])
        cli.run_async(_serve(a.ready_file, a.pool_buffers))
        return 0
    p = cli.ArgumentParser(prog="python -m services.coder.bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=pathlib.Path, default=None, help="write the records as JSON here")
    p.add_argument("--calls", type=cli.number(int, at_least=1), default=300,
                   help="metered calls per op, case and variant")
    p.add_argument("--rate", type=cli.number(float, at_least=0), default=200.0,
                   help="Encode+Decode pairs per second for the process runs; 0 skips them")
    p.add_argument("--duration-s", type=cli.number(float, above=0), default=10.0,
                   help="length of each process run, s")
    p.add_argument("--quick", action="store_true", help="small shapes only (a check that it runs)")
    a = p.parse_args(argv)
    cases = QUICK_CASES if a.quick else CASES
    in_proc = in_process(cases, a.calls)
    shape, k = cases[-1] if a.quick else cases[1]
    rated = at_rate(shape, k, a.rate, a.duration_s) if a.rate > 0 else []
    print(format_tables(in_proc, rated))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"in_process": in_proc, "at_rate": rated,
                                      "cpu_count": os.cpu_count()}, indent=1) + "\n")
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m services.coder.bench")


if __name__ == "__main__":
    sys.exit(main())
