"""How often each decode policy answers with a reconstruction when nothing is slow.

``python -m services.frontend.decode_bench --model BASE.json --parity-model PARITY.json``

Real processes on this machine, no emulated delay, no background traffic, no
fault: 2 data and 1 parity model servers (real ONNX models), one frontend per
configuration, and the load generator (``python -m loadgen``, open-loop
Poisson) at each ``--rates``. Configurations: ``none`` (the base model alone:
the reference top-1 on the same queries), then ``coded`` with
``--decode-policy immediate`` (the paper's rule) and ``late``. For each run:
the reconstructed share of the answers, served top-1 against the labels,
and p50/p99/p99.9 end to end. Issue 14's targets (``late``: reconstructed
share at most 2 % at 200 and 400 q/s, served top-1 within 0.3 points of
``none``'s) are benchmarks for a quiet machine, not timed tests.
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

from services.common.procs import ServiceProcess

CONFIGS = (("none", None), ("coded", "immediate"), ("coded", "late"))


def _loadgen(target, rate, num_queries, warmup, out, inputs, seed):
    argv = [sys.executable, "-m", "loadgen", "--target", target, "--rate", str(rate),
            "--num-queries", str(num_queries), "--warmup-queries", str(warmup), "--out", str(out),
            "--no-progress", "--run-id", out.name, "--seed", str(seed)]
    if inputs:
        argv += ["--inputs", str(inputs)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=num_queries / rate * 5 + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "summary.json").read_text())


def _row(summary):
    o = summary["overall"]
    return {"answered": summary["num_ok"], "sent": summary["num_sent"],
            "reconstructed_share": summary["shares"].get("reconstructed"),
            "top1": o["accuracy"], "p50_ms": o["med"], "p99_ms": o["p99"], "p999_ms": o["p999"],
            "errors": summary["errors"]}


def _pct(value, digits):
    return "-" if value is None else f"{value * 100:.{digits}f} %"


def _ms(value):
    return "-" if value is None else f"{value:.2f}"


def run(args, log=print):
    work = pathlib.Path(tempfile.mkdtemp(prefix="parm-decode-bench-"))
    procs = []
    results = []
    try:
        def server(model, role, name):
            p = ServiceProcess.python_module("services.model_server", [
                "--model", str(model), "--role", role, "--instance-id", name, "--port", "0",
                "--log-level", "WARNING"], name=name)
            procs.append(p)
            return p

        data = [server(args.model, "data", f"data-{i}") for i in range(2)]
        parity = server(args.parity_model, "parity", "parity-0")
        for mode, policy in CONFIGS:
            instances = [f"data={d.address}" for d in data]
            argv = ["--mode", mode, "--model", str(args.model), "--host", "127.0.0.1", "--port", "0",
                    "--log-level", "WARNING"]
            if mode == "coded":
                instances.append(f"parity={parity.address}")
                argv += ["--parity-model", str(args.parity_model), "--decode-policy", policy]
            argv += ["--instances", ",".join(instances)]
            frontend = ServiceProcess.python_module("services.frontend", argv, name=f"frontend-{mode}")
            try:
                for rate in args.rates:
                    name = f"{mode}-{policy or 'base'}-{rate:g}"
                    summary = _loadgen(frontend.address, rate, args.num_queries, args.warmup_queries,
                                       work / name, args.inputs, args.seed)
                    row = {"mode": mode, "decode_policy": policy, "rate": rate, **_row(summary)}
                    results.append(row)
                    log(f"{mode:<6} {policy or '-':<9} {rate:>6g} q/s  reconstructed "
                        f"{_pct(row['reconstructed_share'], 1)}  top-1 {_pct(row['top1'], 2)}  "
                        f"p50 {_ms(row['p50_ms'])}  p99 {_ms(row['p99_ms'])}  p99.9 {_ms(row['p999_ms'])} ms  "
                        f"errors {row['errors'] or 0}")
            finally:
                frontend.stop()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                                               for k, v in vars(args).items()}, "runs": results}, indent=2))
        log(f"results written to {path}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m services.frontend.decode_bench",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=pathlib.Path, help="base model manifest")
    p.add_argument("--parity-model", required=True, type=pathlib.Path, help="parity model manifest")
    p.add_argument("--rates", default="200,400", help="offered rates, q/s, comma-separated")
    p.add_argument("--num-queries", type=int, default=2000, help="measured queries per run")
    p.add_argument("--warmup-queries", type=int, default=200, help="warm-up queries per run (not measured)")
    p.add_argument("--inputs", default=None, help="inputs .npz (X, y); default: the model's dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates: expected numbers, got {args.rates!r}")
    for path in (args.model, args.parity_model):
        if not path.exists():
            p.error(f"{path}: no such manifest")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
