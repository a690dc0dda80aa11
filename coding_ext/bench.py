"""Benchmark of the coding kernels against plain numpy and a memory copy.

    python -m coding_ext.bench [--json PATH] [--repeats N] [--quick]

Pins itself to one core, then for each case times three things, interleaved
round by round so that noise from other processes hits all of them alike:
the kernel, the best plain-numpy equivalent (ufuncs with out=, no
temporaries), and np.copyto of one input of the same size. Reports medians
in microseconds, effective bandwidth (kernel: (k+1) x bytes / time for the
sums and decode, k x input bytes + output bytes for concat; copy: 2 x bytes /
time) and the kernel/numpy speed-up. Speed targets live here, never in tests.
"""

import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

from coding_ext import concat_encode, subtract_decode, sum_encode
from services.common import cli

SHAPES = [(1, 784), (1, 3, 224, 224), (64, 3, 224, 224)]
CONCAT_SHAPES = [(1, 3, 224, 224), (64, 3, 224, 224)]


def _numpy_sum(xs, out):
    np.add(xs[0], xs[1], out=out)
    for x in xs[2:]:
        np.add(out, x, out=out)
    return out


def _numpy_decode(p, avail, out):
    np.subtract(p, avail[0], out=out)
    for a in avail[1:]:
        np.subtract(out, a, out=out)
    return out


def _numpy_concat(xs, out):
    """Pooling written into the tiles of `out` with ufuncs, no temporaries but views."""
    k = len(xs)
    w2 = out.shape[-1] // 2
    if k == 2:
        for i, x in enumerate(xs):
            tile = out[..., i * w2 : (i + 1) * w2]
            np.add(x[..., 0::2], x[..., 1::2], out=tile)
            np.multiply(tile, np.float32(0.5), out=tile)
        return out
    h2 = out.shape[-2] // 2
    scratch = np.empty(out.shape[:-2] + (h2, w2), np.float32)
    for i, x in enumerate(xs):
        tile = out[..., (i // 2) * h2 : (i // 2 + 1) * h2, (i % 2) * w2 : (i % 2 + 1) * w2]
        np.add(x[..., 0::2, 0::2], x[..., 0::2, 1::2], out=tile)
        np.add(x[..., 1::2, 0::2], x[..., 1::2, 1::2], out=scratch)
        np.add(tile, scratch, out=tile)
        np.multiply(tile, np.float32(0.25), out=tile)
    return out


def _time_us(fn, number):
    start = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - start) / number / 1e3


def _measure(fns, repeats, budget_s):
    """Median microseconds per call of each fn, rounds interleaved."""
    for fn in fns:
        fn()
    probe = max(_time_us(fn, 1) for fn in fns)
    # calls per timing so that one timing lasts ~200 us at least
    number = max(1, int(200 / max(probe, 1e-3)))
    rounds = max(5, min(repeats, int(budget_s * 1e6 / (probe * number * len(fns) + 1))))
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for s, fn in zip(samples, fns):
            s.append(_time_us(fn, number))
    return [statistics.median(s) for s in samples], rounds


def _record(op, k, shape, kernel_us, numpy_us, copy_us, nbytes_moved, nbytes, rounds):
    return {
        "op": op,
        "k": k,
        "shape": list(shape),
        "dtype": "float32",
        "kernel_us": round(kernel_us, 3),
        "numpy_us": round(numpy_us, 3),
        "copy_us": round(copy_us, 3),
        "kernel_gbps": round(nbytes_moved / kernel_us / 1e3, 2),
        "copy_gbps": round(2 * nbytes / copy_us / 1e3, 2),
        "bw_vs_copy": round((nbytes_moved / kernel_us) / (2 * nbytes / copy_us), 3),
        "speedup": round(numpy_us / kernel_us, 3),
        "rounds": rounds,
    }


def run(repeats=200, quick=False):
    """Runs every case; returns the list of records."""
    rng = np.random.default_rng(0)
    records = []
    shapes = SHAPES[:2] if quick else SHAPES
    for shape in shapes:
        budget_s = 1.0 if np.prod(shape) < 1e6 else 6.0
        nbytes = int(np.prod(shape)) * 4
        for k in (2, 3, 4):
            xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(k)]
            out = np.empty(shape, np.float32)
            ref = np.empty(shape, np.float32)
            dst = np.empty(shape, np.float32)
            (t_kernel, t_numpy, t_copy), rounds = _measure(
                [lambda: sum_encode(xs, out), lambda: _numpy_sum(xs, ref),
                 lambda: np.copyto(dst, xs[0])],
                repeats, budget_s,
            )
            records.append(_record("sum_encode", k, shape, t_kernel, t_numpy, t_copy,
                                   (k + 1) * nbytes, nbytes, rounds))
            p, avail = xs[0], xs[1:]
            (t_kernel, t_numpy, t_copy), rounds = _measure(
                [lambda: subtract_decode(p, avail, out), lambda: _numpy_decode(p, avail, ref),
                 lambda: np.copyto(dst, xs[0])],
                repeats, budget_s,
            )
            records.append(_record("subtract_decode", k, shape, t_kernel, t_numpy, t_copy,
                                   (k + 1) * nbytes, nbytes, rounds))
            del xs, out, ref, dst, p, avail
    for shape in CONCAT_SHAPES[:1] if quick else CONCAT_SHAPES:
        budget_s = 1.0 if np.prod(shape) < 1e6 else 6.0
        nbytes = int(np.prod(shape)) * 4
        for k in (2, 4):
            xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(k)]
            out = np.empty(shape, np.float32)
            ref = np.empty(shape, np.float32)
            dst = np.empty(shape, np.float32)
            (t_kernel, t_numpy, t_copy), rounds = _measure(
                [lambda: concat_encode(xs, out), lambda: _numpy_concat(xs, ref),
                 lambda: np.copyto(dst, xs[0])],
                repeats, budget_s,
            )
            if not np.array_equal(out, ref):
                raise AssertionError("numpy concat equivalent disagrees with the kernel")
            records.append(_record("concat_encode", k, shape, t_kernel, t_numpy, t_copy,
                                   (k + 1) * nbytes, nbytes, rounds))
            del xs, out, ref, dst
    return records


def format_table(records):
    head = (f"{'op':<16} {'k':>2} {'shape':<18} {'kernel us':>10} {'numpy us':>10} "
            f"{'copy us':>10} {'kern GB/s':>9} {'copy GB/s':>9} {'bw/copy':>7} {'speedup':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['op']:<16} {r['k']:>2} {str(tuple(r['shape'])):<18} {r['kernel_us']:>10.2f} "
            f"{r['numpy_us']:>10.2f} {r['copy_us']:>10.2f} {r['kernel_gbps']:>9.1f} "
            f"{r['copy_gbps']:>9.1f} {r['bw_vs_copy']:>7.2f} {r['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


def _main(argv):
    parser = cli.ArgumentParser(prog="python -m coding_ext.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="write the records as JSON here (default: print only)")
    parser.add_argument("--repeats", type=cli.number(int, at_least=1), default=200,
                        help="timing rounds per case, at most")
    parser.add_argument("--quick", action="store_true",
                        help="skip the (64, 3, 224, 224) cases")
    parser.add_argument("--cpu", type=cli.number(int, at_least=0), default=None,
                        help="core to pin to (default: the last allowed one)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        if args.cpu is not None and args.cpu not in allowed:
            raise cli.UsageError(f"--cpu {args.cpu} is not one of the allowed cores {allowed}")
        os.sched_setaffinity(0, {allowed[-1] if args.cpu is None else args.cpu})
    records = run(repeats=args.repeats, quick=args.quick)
    print(format_table(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m coding_ext.bench")


if __name__ == "__main__":
    sys.exit(main())
