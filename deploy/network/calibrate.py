"""``python -m deploy.network.calibrate``: fit the emulated background model to the testbed.

The emulated network (``deploy.network.background``) says: while a shuffle
touches an instance, every request to it gets an extra delay drawn from
``delay`` and, with probability ``stall_probability``, a further
``stall_ms``; a shuffle touches its two instances for
``2 * size_mb * 8 / bandwidth_mbps`` seconds. This command measures what
those parameters are on the namespace testbed (``deploy.network.netns``)
instead of choosing them:

1. a testbed of ``--instances`` hosts (the default is ``configs/local.json``'s
   4 + 2 instances) at the testbed's fixed link parameters, a shuffle agent on
   each host;
2. probes from the runner's namespace to every host, each a
   ``--request-bytes`` request answered with ``--reply-bytes`` (the local
   model's query and answer sizes) over one persistent TCP connection per
   host (as the frontend's one gRPC channel per instance), Poisson at
   ``--probe-rate`` per host: first ``--idle-s`` seconds with no background
   (the baseline), then ``--duration-s`` seconds with ``--shuffles``
   concurrent shuffles of the testbed's sizes between random hosts;
3. a probe *overlaps* a transfer when it is sent while a shuffle involving its
   host is in flight; its **extra** delay is its latency minus the idle
   median;
4. the fit: the model is a mixture, an exponential delay plus, with some
   probability, a fixed stall. For a threshold ``t``, a **stall** is an extra
   of at least ``t``; ``stall_probability`` = stalls / overlapping probes,
   ``stall_ms`` = the median extra of the stalls (200 ms, Linux's minimum
   retransmission timeout, if there were none); ``delay`` = exponential with
   ``mean_ms`` = the mean extra of the non-stalls, negatives counted as 0
   (its maximum-likelihood fit). ``t`` is the one of ``THRESHOLDS_MS`` whose
   model matches the measured extra best: the smallest sum over the
   quantiles p50, p90, p99 and p99.9 of ``log((model + 1) / (measured + 1))``
   squared (a short tail of queueing delay alone is better matched by a rare
   "stall" of a few tens of ms than by stretching the exponential). The
   criterion is agreement with this measurement only, never a result of the
   system;
   ``bandwidth_mbps`` = the median of each transfer's ``2 * bytes * 8 /
   duration`` (so the emulated shuffles last as long as the real ones);
   ``size_mb`` = the testbed's shuffle sizes.

The result, with the measured and the fitted model's quantiles side by side,
the command, the date and the machine, goes to ``--out`` (default
``configs/emulation-calibrated.json``, which the runner's emulated network
uses by default; ``python -m deploy.runner.local --emulation FILE`` takes
another). Like the runner, it runs inside the testbed's sandbox
(``deploy.network.sandbox``): no root needed, nothing left behind.
"""

import asyncio
import datetime
import json
import logging
import os
import pathlib
import platform
import random
import shlex
import statistics
import sys

from services.common import cli
from services.common.clock import REAL as REAL_CLOCK

log = logging.getLogger("deploy.network.calibrate")

PROG = "python -m deploy.network.calibrate"
DEFAULT_OUT = "configs/emulation-calibrated.json"
#: Candidate stall thresholds (ms) of the fit.
THRESHOLDS_MS = tuple(float(t) for t in (*range(5, 50, 5), *range(50, 201, 25)))
FIT_QUANTILES = (50, 90, 99, 99.9)
DEFAULT_STALL_MS = 200.0
#: A probe sent this close to the end may overlap a transfer still in flight
#: (not yet in the timeline); such probes are left out.
_TAIL_EXCLUDE_S = 10.0


def parse_config(argv):
    p = cli.ArgumentParser(prog=PROG, description="Fit the emulated background model to the namespace "
                                                  "testbed's real shuffles (see the module doc).")
    p.add_argument("--out", default=DEFAULT_OUT, help="where the fitted parameters go")
    p.add_argument("--instances", type=int, default=6, help="instance hosts (local.json: 4 + 2)")
    p.add_argument("--shuffles", type=int, default=2, help="concurrent background shuffles (local.json: 2)")
    p.add_argument("--duration-s", type=float, default=300.0, help="seconds of probing under the shuffles")
    p.add_argument("--idle-s", type=float, default=20.0, help="seconds of probing without background first")
    p.add_argument("--probe-rate", type=float, default=20.0, help="probes per second to each host (Poisson)")
    p.add_argument("--request-bytes", type=int, default=3136, help="probe request size (an MNIST query)")
    p.add_argument("--reply-bytes", type=int, default=64, help="probe answer size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    if a.instances < 2:
        raise cli.UsageError("--instances must be >= 2 (a shuffle needs two hosts)")
    if a.shuffles < 1:
        raise cli.UsageError("--shuffles must be >= 1")
    if a.duration_s <= 0 or a.idle_s <= 0 or a.probe_rate <= 0:
        raise cli.UsageError("--duration-s, --idle-s and --probe-rate must be > 0")
    if not 1 <= a.request_bytes <= 1 << 20 or not 0 <= a.reply_bytes <= 1 << 20:
        raise cli.UsageError("--request-bytes must be in 1..1048576 and --reply-bytes in 0..1048576")
    return a


# -- measuring ------------------------------------------------------------------


class ProbeChannel:
    """One persistent connection to a host's agent; probes pipelined, answered in order."""

    def __init__(self, host, address, request_bytes, reply_bytes, clock=None):
        self.host, self.address = host, address
        self.request_bytes, self.reply_bytes = request_bytes, reply_bytes
        self.clock = (clock or REAL_CLOCK).now  # a services.common.clock.Clock
        self.sent = {}       # id -> send time
        self.samples = []    # (host, send_s, latency_ms)
        self._payload = bytes(request_bytes)
        self._reader = self._writer = self._task = None

    async def open(self):
        host, _, port = self.address.rpartition(":")
        self._reader, self._writer = await asyncio.open_connection(host, int(port))
        self._writer.write(b"PROBE\n")
        self._task = asyncio.ensure_future(self._read())

    async def _read(self):
        while True:
            line = await self._reader.readline()
            parts = line.decode().split()
            if len(parts) != 2 or parts[0] != "R":
                return
            await self._reader.readexactly(self.reply_bytes)
            now = self.clock()
            sent = self.sent.pop(int(parts[1]), None)
            if sent is not None:
                self.samples.append((self.host, sent, (now - sent) * 1e3))

    async def probe(self, probe_id):
        self.sent[probe_id] = self.clock()
        self._writer.write(f"P {probe_id} {self.request_bytes} {self.reply_bytes}\n".encode() + self._payload)
        await self._writer.drain()

    async def close(self, wait_s=3.0):
        deadline = self.clock() + wait_s
        while self.sent and self.clock() < deadline:
            await asyncio.sleep(0.05)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()


async def _probe_loop(channel, rate, until_s, rng, ids):
    while channel.clock() < until_s:
        await asyncio.sleep(rng.expovariate(rate))
        await channel.probe(next(ids))


async def measure(agents, cfg, size_bytes, clock=None):
    """Probes ``agents`` (addresses) idle, then under shuffles; returns the raw measurements."""
    import itertools

    from deploy.network.shuffle import ShuffleCoordinator

    clock = clock or REAL_CLOCK
    rng = random.Random(cfg.seed)
    ids = itertools.count()
    channels = [ProbeChannel(i, a, cfg.request_bytes, cfg.reply_bytes, clock) for i, a in enumerate(agents)]
    for ch in channels:
        await ch.open()
    t0 = clock.now()
    idle_end = t0 + cfg.idle_s
    await asyncio.gather(*(_probe_loop(ch, cfg.probe_rate, idle_end, random.Random(rng.random()), ids)
                           for ch in channels))
    coordinator = ShuffleCoordinator(agents, cfg.shuffles, size_bytes=tuple(size_bytes), seed=cfg.seed,
                                     clock=clock)
    bg_start = clock.now()
    coordinator.start()
    end = bg_start + cfg.duration_s
    try:
        await asyncio.gather(*(_probe_loop(ch, cfg.probe_rate, end, random.Random(rng.random()), ids)
                               for ch in channels))
    finally:
        bg_end = clock.now()
        await coordinator.stop()
        for ch in channels:
            await ch.close()
    samples = sorted(s for ch in channels for s in ch.samples)
    lost = sum(len(ch.sent) for ch in channels)
    return {"samples": samples, "lost": lost, "idle": (t0, idle_end), "background": (bg_start, bg_end),
            "timeline": list(coordinator.timeline), "failed_shuffles": coordinator.stats.failed}


# -- fitting --------------------------------------------------------------------


def _quantiles(values, qs=FIT_QUANTILES):
    import numpy as np

    if not values:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": round(float(np.percentile(values, q)), 3) for q in qs}


def fit(raw, size_bytes, seed=0):
    """The emulated model's parameters from ``measure``'s output, and the evidence."""
    samples, timeline = raw["samples"], raw["timeline"]
    idle_lo, idle_hi = raw["idle"]
    bg_lo, bg_hi = raw["background"]
    idle = [lat for _, t, lat in samples if idle_lo <= t < idle_hi]
    if len(idle) < 20:
        raise cli.Failure(f"only {len(idle)} idle probes came back; run longer (--idle-s)")
    base = statistics.median(idle)
    spans = {}
    for span in timeline:
        for host in (span.src, span.dst):
            spans.setdefault(host, []).append((span.start_s, span.end_s))
    overlapping, untouched = [], []
    for host, t, lat in samples:
        if not bg_lo <= t < bg_hi - _TAIL_EXCLUDE_S:
            continue
        touched = any(s <= t < e for s, e in spans.get(host, ()))
        (overlapping if touched else untouched).append(lat - base)
    if len(overlapping) < 20:
        raise cli.Failure(f"only {len(overlapping)} probes overlapped a transfer; run longer (--duration-s)")
    candidates = [_fit_at(overlapping, t, seed) for t in THRESHOLDS_MS]
    best = min(candidates, key=lambda c: c["score"])
    stall_p, stall_ms, mean_ms = best["stall_probability"], best["stall_ms"], best["mean_ms"]
    stalls = [x for x in overlapping if x >= best["threshold_ms"]]
    rates = [2 * s.nbytes * 8 / (s.end_s - s.start_s) / 1e6 for s in timeline if s.end_s > s.start_s]
    if not rates:
        raise cli.Failure("no shuffle completed; run longer (--duration-s)")
    background = {
        "bandwidth_mbps": round(statistics.median(rates), 3),
        "size_mb": [round(b / 1e6, 6) for b in size_bytes],
        "delay": {"kind": "exponential", "params": {"mean_ms": round(mean_ms, 3)}},
        "stall_probability": round(stall_p, 6),
        "stall_ms": round(stall_ms, 3),
    }
    evidence = {
        "probes": {"idle": len(idle), "overlapping": len(overlapping), "not_overlapping": len(untouched),
                   "lost": raw["lost"]},
        "idle_latency_ms": {"median": round(base, 3), **_quantiles(idle)},
        "stall_threshold_ms": best["threshold_ms"],
        "stalls": len(stalls),
        "extra_ms_measured": _quantiles(overlapping),
        "extra_ms_fitted_model": best["quantiles"],
        "candidates": [{k: c[k] for k in ("threshold_ms", "score", "stall_probability", "stall_ms", "mean_ms")}
                       for c in candidates],
        "extra_ms_not_overlapping": _quantiles(untouched),
        "transfers": {"completed": len(timeline), "failed": raw["failed_shuffles"],
                      "mbps": _quantiles(rates, (10, 50, 90))},
    }
    return background, evidence


def _model_draws(mean_ms, stall_p, stall_ms, n, seed):
    """The fitted model's extra delay, drawn as the model servers draw it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    delay = rng.exponential(mean_ms, n) if mean_ms > 0 else np.zeros(n)
    return delay + np.where(rng.random(n) < stall_p, stall_ms, 0.0)


def _fit_at(extras, threshold_ms, seed, n=200_000):
    """The model fitted with stall threshold ``threshold_ms``, its quantiles and its score."""
    import numpy as np

    stalls = [x for x in extras if x >= threshold_ms]
    rest = [max(x, 0.0) for x in extras if x < threshold_ms]
    stall_p = len(stalls) / len(extras)
    stall_ms = statistics.median(stalls) if stalls else DEFAULT_STALL_MS
    mean_ms = statistics.fmean(rest) if rest else 0.0
    draws = _model_draws(mean_ms, stall_p, stall_ms, n, seed)
    model_q = np.percentile(draws, FIT_QUANTILES)
    measured_q = np.percentile(extras, FIT_QUANTILES)
    score = float(np.sum(np.log((np.maximum(model_q, 0) + 1) / (np.maximum(measured_q, 0) + 1)) ** 2))
    return {"threshold_ms": threshold_ms, "score": round(score, 5), "stall_probability": round(stall_p, 6),
            "stall_ms": round(stall_ms, 3), "mean_ms": round(mean_ms, 3),
            "quantiles": {f"p{q:g}": round(float(v), 3) for q, v in zip(FIT_QUANTILES, model_q)}}


def machine():
    """Where a calibration ran (the file records it)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"hostname": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in load] if load else None}


def calibrate(cfg, argv, machine_info):
    from deploy.network.netns import NetnsLauncher, Testbed, TestbedSpec

    spec = TestbedSpec(num_hosts=cfg.instances)
    started = datetime.datetime.now(datetime.timezone.utc)
    with Testbed(spec) as testbed, NetnsLauncher(testbed) as launcher:
        agents = [launcher.start("deploy.network.shuffle", ["agent", "--host", launcher.bind_address(i)],
                                 name=f"calibrate-agent-{i}", host=i) for i in range(cfg.instances)]
        raw = cli.run_async(measure([a.address for a in agents], cfg, spec.shuffle_bytes))
        network = testbed.describe()
    background, evidence = fit(raw, spec.shuffle_bytes, seed=cfg.seed)
    return {
        "background": background,
        "calibration": {
            "command": " ".join([PROG, *map(shlex.quote, argv)]),
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info,
            "testbed": {k: network[k] for k in ("rate_mbit", "queue_ms", "queue_limit_bytes", "burst_bytes",
                                                "shaped", "qdisc", "shuffle_bytes", "hosts")},
            "settings": {"instances": cfg.instances, "shuffles": cfg.shuffles, "duration_s": cfg.duration_s,
                         "idle_s": cfg.idle_s, "probe_rate_per_host": cfg.probe_rate,
                         "request_bytes": cfg.request_bytes, "reply_bytes": cfg.reply_bytes, "seed": cfg.seed},
            "fit_rules": "for each candidate threshold: stall = extra >= threshold, stall_probability = "
                         "stalls/overlapping, stall_ms = median stall extra, delay = exponential with the mean "
                         "of the other extras (negatives as 0); the threshold whose model's p50/p90/p99/p99.9 "
                         "of the extra is closest to the measured (sum of squared log ratios) wins; "
                         "bandwidth_mbps = median 2*bytes*8/duration of the transfers",
            **evidence,
        },
    }


def _main(argv):
    from deploy.network import sandbox

    cfg = parse_config(argv)
    cli.setup_logging(cfg.log_level)
    if not sandbox.inside():
        try:
            kind = sandbox.mode()
        except sandbox.SandboxUnavailable as exc:
            raise cli.Failure(f"the namespace testbed cannot run here: {exc}") from None
        out = pathlib.Path(cfg.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"calibrating on the namespace testbed {sandbox.describe_mode(kind)}: {cfg.instances} hosts, "
              f"{cfg.shuffles} shuffles, {cfg.idle_s:g} s idle + {cfg.duration_s:g} s", flush=True)
        # The machine is described from outside the sandbox (its load, its name).
        os.environ["PARM_CALIBRATE_MACHINE"] = json.dumps(machine())
        return sandbox.run_module("deploy.network.calibrate", [*argv, "--out", str(out)], kind)
    info = json.loads(os.environ.get("PARM_CALIBRATE_MACHINE") or "null") or machine()
    shown = list(argv)
    if "--out" in shown:  # the path the caller gave, not the absolute one added above
        i = len(shown) - 1 - shown[::-1].index("--out")
        del shown[i:i + 2]
    result = calibrate(cfg, shown, info)
    out = pathlib.Path(cfg.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bg, ev = result["background"], result["calibration"]
    print(f"fitted: delay exponential mean {bg['delay']['params']['mean_ms']:g} ms, stall probability "
          f"{bg['stall_probability']:g}, stall {bg['stall_ms']:g} ms, shuffle rate {bg['bandwidth_mbps']:g} Mbit/s "
          f"({ev['probes']['overlapping']} overlapping probes, {ev['stalls']} stalls)")
    print(f"measured extra ms {ev['extra_ms_measured']}; fitted model {ev['extra_ms_fitted_model']}")
    print(f"written: {out}")
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
