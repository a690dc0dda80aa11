"""Frontend benchmark (``make bench``): added latency, sustainable rate, profile.

Everything runs on this machine as separate processes: two model servers with
a trivial model (a 4 -> 3 MatMul), the frontend in ``none`` mode, a bare
pass-through proxy for reference (``Predict`` -> ``Infer`` on round-robin
instances, nothing else), and an open-loop Poisson load generator process.

1. Added latency: a closed-loop client sends ``--latency-queries`` requests,
   one at a time, to (a) a model server directly, (b) the proxy, (c) the
   frontend; medians and p99 side by side; the frontend's added latency is
   its median minus the direct median.
2. Sustainable rate: for the proxy and the frontend, open-loop Poisson load at
   increasing rates (``--rates``) for ``--duration-s`` each; the highest rate
   whose p99 is under ``--p99-target-ms`` with no errors and at least 95% of
   the offered rate achieved.
3. Profile: the frontend again, under cProfile, at ``--profile-rate``; the
   functions with the most own time.

Subcommands used internally: ``proxy`` (the pass-through proxy) and ``load``
(one load-generator run; prints JSON).
"""

import asyncio
import io
import itertools
import json
import os
import pathlib
import shutil
import pstats
import sys
import tempfile
import time

import numpy as np
import psutil

from parm.v1 import frontend_pb2, frontend_pb2_grpc, model_server_pb2, model_server_pb2_grpc, tensor_pb2
from services.common import cli, tensors
from services.common.procs import ServiceProcess, write_ready_file
from services.common.server import create_server, insecure_channel, run_until_signal

IN_SHAPE = (4,)


def write_trivial_model(directory, in_size=IN_SHAPE[0], out_size=3, *, parity_k=None):
    """An ``in_size`` -> ``out_size`` MatMul ONNX model and its manifest; returns the manifest path.

    With ``parity_k``, also ``trivial-parity.json``: the same (linear) model as
    the parity model of a sum-encoded group of ``parity_k``, which decodes
    exactly (F(x1 + x2) = F(x1) + F(x2)).
    """
    import dataclasses

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from services.common.manifest import Manifest

    w = (np.arange(in_size * out_size, dtype=np.float32).reshape(in_size, out_size) % 7) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])], "trivial",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", out_size])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / "trivial.onnx"))
    base = Manifest(name="trivial", role="base", arch="linear", dataset="synthetic", split_seed=0, split={},
                    input_shape=(in_size,), input_dtype="float32", output_shape=(out_size,),
                    onnx_file="trivial.onnx")
    base.save(directory / "trivial.json")
    if parity_k:
        dataclasses.replace(base, name="trivial-parity", role="parity", k=parity_k, encoder="sum",
                            base_model="trivial").save(directory / "trivial-parity.json")
    return directory / "trivial.json"


# ---------------------------------------------------------------- proxy
class PassThroughProxy(frontend_pb2_grpc.FrontendServicer):
    """The reference: Predict -> ModelServer.Infer round robin, nothing else."""

    def __init__(self, addresses):
        self.channels = [insecure_channel(a) for a in addresses]
        self.stubs = itertools.cycle([model_server_pb2_grpc.ModelServerStub(c).Infer for c in self.channels])

    async def Predict(self, request, context):
        t = request.input
        reply = await next(self.stubs)(model_server_pb2.InferRequest(input=tensor_pb2.Tensor(
            dtype=t.dtype, shape=[1, *t.shape], data=t.data)), timeout=2.0)
        out = reply.output
        return frontend_pb2.PredictResponse(output=tensor_pb2.Tensor(
            dtype=out.dtype, shape=out.shape[1:], data=out.data), source=frontend_pb2.ORIGINAL)


async def _proxy_main(args):
    built = create_server(f"127.0.0.1:{args.port}", [(frontend_pb2_grpc.add_FrontendServicer_to_server,
                                                      PassThroughProxy(args.instances.split(",")),
                                                      "parm.v1.Frontend")])
    await built.server.start()
    await built.set_serving(True)
    write_ready_file(args.ready_file, built.port)
    await run_until_signal(built, grace_s=0.5)


# ---------------------------------------------------------------- load
def _request(size=IN_SHAPE[0]):
    x = np.linspace(-1, 1, size, dtype=np.float32)
    return frontend_pb2.PredictRequest(input=tensors.to_proto(x))


async def _load_main(args):
    """Open-loop Poisson load; prints {offered, achieved, p50_ms, p99_ms, errors}."""
    rng = np.random.default_rng(args.seed)
    req = _request(args.input_size)
    lat = []
    errors = 0
    async with insecure_channel(args.target) as ch:
        predict = frontend_pb2_grpc.FrontendStub(ch).Predict
        for _ in range(50):                       # warm-up, not measured
            await predict(req, timeout=5)

        async def one():
            nonlocal errors
            t0 = time.perf_counter()
            try:
                await predict(req, timeout=args.timeout_s)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
                return
            lat.append(time.perf_counter() - t0)

        n = int(args.rate * args.duration_s)
        gaps = rng.exponential(1.0 / args.rate, n)
        tasks = []
        start = time.perf_counter()
        due = start
        for gap in gaps:
            due += gap
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        send_end = time.perf_counter()
        await asyncio.gather(*tasks)
    lat_ms = np.array(lat) * 1e3
    print(json.dumps({
        "offered_qps": args.rate, "sent": n, "achieved_qps": n / (send_end - start),
        "completed": len(lat), "errors": errors,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else None,
    }))


# ---------------------------------------------------------------- closed-loop latency
async def _closed_loop(address, n, warmup, direct):
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    lat = []
    async with insecure_channel(address) as ch:
        if direct:
            call = model_server_pb2_grpc.ModelServerStub(ch).Infer
            req = model_server_pb2.InferRequest(input=tensors.to_proto(x[None]))
        else:
            call = frontend_pb2_grpc.FrontendStub(ch).Predict
            req = frontend_pb2.PredictRequest(input=tensors.to_proto(x))
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await call(req, timeout=5)
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
    ms = np.array(lat) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "n": n}


def run_load(target, rate, duration_s, seed=0, input_size=IN_SHAPE[0]):
    """One open-loop run by a load-generator process (the ``load`` subcommand); its JSON summary."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "services.frontend.bench", "load", "--target", target,
                           "--rate", str(rate), "--duration-s", str(duration_s), "--seed", str(seed),
                           "--input-size", str(input_size)],
                          capture_output=True, text=True, timeout=duration_s * 10 + 60)
    if proc.returncode != 0:
        return {"offered_qps": rate, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sweep(target, rates, duration_s, p99_target_ms, log):
    runs = []
    best = None
    for rate in rates:
        r = run_load(target, rate, duration_s)
        runs.append(r)
        log(f"  {rate:>6.0f} q/s offered: " + (
            f"achieved {r['achieved_qps']:.0f}, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
            f"errors {r['errors']}" if "error" not in r and r.get("p99_ms") is not None else str(r)))
        ok = ("error" not in r and r.get("p99_ms") is not None and r["p99_ms"] < p99_target_ms
              and r["errors"] == 0 and r["achieved_qps"] >= 0.95 * rate)
        if ok:
            best = rate
        elif best is not None and r.get("p99_ms", 1e9) and r.get("p99_ms", 1e9) > 3 * p99_target_ms:
            break
    return best, runs


def _frontend_argv(model, instances, extra=()):
    return ["--mode", "none", "--model", str(model), "--instances",
            ",".join(f"data={a}" for a in instances), "--host", "127.0.0.1", "--port", "0",
            "--log-level", "WARNING", *extra]


def _category(filename, name):
    if "services/frontend" in filename:
        return "frontend (engine, servicers)"
    if "services/common" in filename:
        return "services.common (tensors, errors)"
    if "grpc" in filename or "_contextvars.Context" in name:
        # grpc.aio's Cython glue and C core run inside loop callbacks (Context.run)
        return "grpc (aio glue + C core, in loop callbacks)"
    if "epoll" in name or "selectors" in filename:
        return "waiting in epoll (idle)"
    if "asyncio" in filename:
        return "asyncio event loop"
    if "prometheus" in filename:
        return "prometheus"
    if "google/protobuf" in filename or "numpy" in filename:
        return "protobuf/numpy"
    return "other (imports, startup, ...)"


def _profile_top(path, n=18):
    """The ``n`` functions with most own time, and own time summed by category."""
    s = io.StringIO()
    stats = pstats.Stats(str(path), stream=s)
    stats.sort_stats("tottime").print_stats(n)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    by_cat = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():
        cat = _category(filename, name)
        by_cat[cat] = by_cat.get(cat, 0.0) + tottime
    return lines[start:start + n + 1], stats.total_tt, dict(sorted(by_cat.items(), key=lambda kv: -kv[1]))


def bench(args):
    out = {"machine": {"cpus": os.cpu_count()}, "config": vars(args).copy()}
    log = print
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="parm-bench-"))
    model = write_trivial_model(tmp)
    procs = []
    try:
        servers = [ServiceProcess.python_module("services.model_server", [
            "--model", model, "--role", "data", "--port", "0", "--log-level", "WARNING"], name=f"ms{i}")
            for i in range(args.instances)]
        procs += servers
        addrs = [s.address for s in servers]
        proxy = ServiceProcess.python_module("services.frontend.bench", [
            "proxy", "--instances", ",".join(addrs)], name="proxy")
        procs.append(proxy)
        frontend = ServiceProcess.python_module("services.frontend", _frontend_argv(
            model, addrs, ["--max-in-flight", str(args.max_in_flight)]), name="frontend")
        procs.append(frontend)
        targets = [("proxy", proxy), ("frontend", frontend)]
        if args.max_coalesce > 1:
            coalescing = ServiceProcess.python_module("services.frontend", _frontend_argv(
                model, addrs, ["--max-in-flight", str(args.max_in_flight),
                               "--max-coalesce", str(args.max_coalesce)]), name="frontend-coalescing")
            procs.append(coalescing)
            targets.append((f"frontend+coalesce{args.max_coalesce}", coalescing))

        log("== added latency (closed loop, one request at a time)")
        lat = {
            "direct": asyncio.run(_closed_loop(addrs[0], args.latency_queries, 200, True)),
            "proxy": asyncio.run(_closed_loop(proxy.address, args.latency_queries, 200, False)),
            "frontend": asyncio.run(_closed_loop(frontend.address, args.latency_queries, 200, False)),
        }
        lat["frontend_added_p50_ms"] = lat["frontend"]["p50_ms"] - lat["direct"]["p50_ms"]
        lat["proxy_added_p50_ms"] = lat["proxy"]["p50_ms"] - lat["direct"]["p50_ms"]
        for k in ("direct", "proxy", "frontend"):
            log(f"  {k:<9} p50 {lat[k]['p50_ms']:.3f} ms  p99 {lat[k]['p99_ms']:.3f} ms")
        log(f"  frontend adds {lat['frontend_added_p50_ms']:.3f} ms at the median "
            f"(proxy adds {lat['proxy_added_p50_ms']:.3f} ms)")
        out["latency"] = lat

        rates = [float(r) for r in args.rates.split(",")]
        out["rate"] = {}
        for name, proc in targets:
            log(f"== sustainable rate: {name} (p99 < {args.p99_target_ms} ms)")
            pid = psutil.Process(proc.pid)
            cpu0 = sum(pid.cpu_times()[:2])
            best, runs = _sweep(proc.address, rates, args.duration_s, args.p99_target_ms, log)
            sent = sum(r.get("sent", 0) + 50 for r in runs)
            cpu_us = 1e6 * (sum(pid.cpu_times()[:2]) - cpu0) / max(1, sent)
            out["rate"][name] = {"best_qps": best, "runs": runs, "cpu_us_per_query": cpu_us}
            log(f"  {name}: highest rate with p99 < {args.p99_target_ms} ms = {best} "
                f"(process CPU {cpu_us:.0f} us per query over the sweep)")
        for _, proc in targets[1:]:
            proc.stop()

        if args.profile_rate:
            log(f"== profile of the frontend at {args.profile_rate:.0f} q/s")
            prof = tmp / "frontend.prof"
            profiled = ServiceProcess([sys.executable, "-m", "cProfile", "-o", str(prof), "-m",
                                       "services.frontend", *_frontend_argv(
                                           model, addrs, ["--max-in-flight", str(args.max_in_flight)])],
                                      name="frontend-profiled")
            procs.append(profiled)
            run = run_load(profiled.address, args.profile_rate, args.duration_s)
            profiled.stop(grace_s=20)
            top, total, by_cat = _profile_top(prof)
            out["profile"] = {"load": run, "total_s": total, "own_time_by_category_s": by_cat,
                              "top_tottime": top}
            busy = total - by_cat.get("waiting in epoll (idle)", 0.0)
            for cat, t in by_cat.items():
                log(f"  {cat:<45} {t:7.3f} s" + (f"  ({100 * t / busy:.0f}% of busy time)"
                                                  if "epoll" not in cat else ""))
            for ln in top:
                log("  " + ln)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        log(f"results written to {path}")
    return out


def _main(argv):
    p = cli.ArgumentParser(prog="python -m services.frontend.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("run", help="the benchmark (default)")
    for q in (p, b):
        q.add_argument("--json", default=None, help="write results here")
        q.add_argument("--instances", type=int, default=2, help="model servers")
        q.add_argument("--max-in-flight", type=int, default=4, help="frontend --max-in-flight")
        q.add_argument("--max-coalesce", type=int, default=8,
                       help="frontend --max-coalesce for the second frontend configuration (1 = skip it)")
        q.add_argument("--latency-queries", type=int, default=2000, help="closed-loop requests per target")
        q.add_argument("--rates", default="250,500,750,1000,1250,1500,1750,2000", help="offered rates, q/s")
        q.add_argument("--duration-s", type=float, default=5.0, help="seconds per rate")
        q.add_argument("--p99-target-ms", type=float, default=20.0,
                       help="a rate is sustained if its p99 stays under this, ms")
        q.add_argument("--profile-rate", type=float, default=800.0, help="q/s for the profile (0 = skip)")
    x = sub.add_parser("proxy", help="(internal) the pass-through proxy")
    x.add_argument("--instances", required=True, help="model server addresses, comma-separated")
    x.add_argument("--port", type=int, default=0, help="port (0 = a free one)")
    x.add_argument("--ready-file", default=None, help="write {port, pid} JSON here once serving")
    ld = sub.add_parser("load", help="(internal) one open-loop run; prints JSON")
    ld.add_argument("--target", required=True, help="frontend host:port")
    ld.add_argument("--rate", type=float, required=True, help="offered rate, q/s")
    ld.add_argument("--duration-s", type=float, default=5.0, help="seconds of load")
    ld.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each query, s")
    ld.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    ld.add_argument("--input-size", type=int, default=IN_SHAPE[0], help="floats per query")
    args = p.parse_args(argv)
    cli.setup_logging("WARNING")
    if args.cmd == "proxy":
        cli.run_async(_proxy_main(args))
    elif args.cmd == "load":
        cli.run_async(_load_main(args))
    else:
        bench(args)


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m services.frontend.bench")


if __name__ == "__main__":
    sys.exit(main())
