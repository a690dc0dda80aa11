"""``python -m deploy.runner.local CONFIG``: run an experiment sweep (``make local``).

For every run of the sweep (``deploy.runner.config``), in order:

1. start a deployment (``deploy.runner.deployment``): registry, the instances of
   the run's redundancy mode, the frontend (which writes its per-query and
   per-group records into the run's folder);
2. start the background traffic: emulated (``deploy.network.background``, through
   the model servers' perturbation RPC) on one machine, or real shuffles
   between shuffle agents (``deploy.network.shuffle``) on the namespace testbed or an
   AWS fleet; ``"clipper"`` starts a second, independent deployment beside
   the first, under its own modest load;
3. run the load: ``num_clients`` load-generator control services
   (``python -m loadgen serve``), driven together with
   ``loadgen.control.run_remote`` (the same path an AWS run takes);
4. stop everything, then print the run's E2E table (and, in coded mode, the
   encoding and decoding tables) and write ``summary.json`` and the records.

At the end: a comparison across modes, and ``results/<experiment>/report.md``
with the tables and plots.

The network (``choose_network``): ``auto`` (``configs/local.json``'s) is the
namespace testbed wherever this machine can make it and the emulated network
elsewhere, said in one line either way; ``netns`` fails in one line where the
testbed cannot run. A testbed run runs itself again inside the sandbox
(``deploy.network.sandbox``: no root needed; everything it makes dies with
it, even on ``kill -9``) and waits for it; results go to
``results/<experiment>-netns/``.

Cleanup invariant: every process is started through one ``Launcher`` per
sweep, whose ``stop_all`` runs in a ``finally`` — after a failed step, on
Ctrl-C (SIGINT) and on SIGTERM (turned into ``KeyboardInterrupt``) — so
nothing is left running. Children run in their own process groups, so a
Ctrl-C reaches only the runner, which then stops them in order.
"""

import asyncio
import dataclasses
import json
import logging
import pathlib
import shutil
import signal
import sys
import time
from dataclasses import dataclass

from deploy.runner import config as config_mod
from deploy.runner import tail
from deploy.runner.deployment import DeploymentError, Placement, ensure_models, resolve_models, start_deployment
from deploy.runner.launcher import LocalLauncher
from deploy.runner.report import comparison, cpu_contention, format_comparison, mode_label, write_report
from services.common import cli
from services.common.cpustat import MachineCpu

log = logging.getLogger("deploy.runner.local")


@dataclass(frozen=True)
class RunnerConfig:
    config: str
    out_dir: str = "results"
    artifacts: str = "artifacts"
    agents: str = ""
    network: str = ""
    model: str = ""
    num_queries: int = 0
    build_models: bool = True
    progress: bool = True
    emulated_twin: bool = False
    log_level: str = "WARNING"
    tls_dir: str = ""
    emulation: str = ""


PROG = "python -m deploy.runner.local"


def resolve_config_path(name):
    """A config path, or a bare name (``fig9a-local``) looked up as ``configs/NAME.json``."""
    path = pathlib.Path(name)
    if not path.exists() and not path.suffix and "/" not in name:
        candidate = pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{name}.json"
        if candidate.exists():
            return str(candidate)
    return name


def parse_config(argv):
    p = cli.ArgumentParser(
        prog=PROG,
        description="Run an experiment sweep (a JSON config) on this machine and report it.",
    )
    p.add_argument("config", help="sweep config, e.g. configs/local.json, or its name: local")
    p.add_argument("--out", dest="out_dir", default="results", help="results root (results/<experiment_id>/...)")
    p.add_argument("--artifacts", default="artifacts", help="directory with the ONNX models and manifests")
    p.add_argument("--agents", default="", help="JSON file {frontend, workers, clients} of node-agent "
                                               "addresses: run on those hosts (AWS) instead of this machine")
    p.add_argument("--network", choices=("", *config_mod.NETWORKS), default="",
                   help="override the config's network: auto (the namespace testbed where this machine "
                        "can make it, else emulated), emulated, netns (default: the config's; "
                        "configs/local.json says auto)")
    p.add_argument("--emulation", default="",
                   help="emulated background model from this calibration file (deploy.network.calibrate) "
                        "instead of the config's (default: the config's, whose defaults are "
                        "configs/emulation-calibrated.json)")
    p.add_argument("--model", default="", help="override the config's model (artifact or arch name)")
    p.add_argument("--num-queries", type=int, default=0, help="override num_queries of every run (0 = config)")
    p.add_argument("--no-build", dest="build_models", action="store_false",
                   help="fail instead of training missing default models")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--emulated-twin", dest="emulated_twin", action="store_true",
                   help="on the netns testbed, also run the same sweep under the emulated model and "
                        "report the two side by side (doubles the time)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--tls-dir", default="",
                   help="mutual TLS on every gRPC hop, with a private CA and certificates made in this "
                        "directory (deploy.certs); default: plaintext")
    a = p.parse_args(argv)
    if a.num_queries < 0:
        p.error("--num-queries must be >= 0")
    a.config = resolve_config_path(a.config)
    return RunnerConfig(**vars(a))


def _sigterm(signum, frame):
    raise KeyboardInterrupt


class Sweep:
    """Runs the runs of a sweep with one launcher; see the module docstring."""

    def __init__(self, cfg, sweep, launcher, placement, *, testbed=None):
        self.cfg = cfg
        self.sweep = sweep
        self.launcher = launcher
        self.placement = placement
        self.testbed = testbed
        self.root = pathlib.Path(cfg.out_dir) / sweep.experiment_id
        self.runs = sweep.runs()
        self.results = []
        self._bar = None

    def run_all(self):
        from tqdm import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        total = sum(r.warmup_queries + r.num_queries for r in self.runs)
        self._bar = tqdm(total=total, unit="q", disable=not self.cfg.progress, dynamic_ncols=True,
                         bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} q [{elapsed}<{remaining}]")
        try:
            for i, run in enumerate(self.runs):
                self._bar.set_description(
                    f"run {i + 1}/{len(self.runs)} {run.redundancy_mode} k={run.k} rate={run.send_rate:g}"
                )
                done_before = self._bar.n
                result = self.run_one(i, run)
                self._bar.update(done_before + run.warmup_queries + run.num_queries - self._bar.n)
                self.results.append(result)
                self._print(self.format_run(result))
        finally:
            self._bar.close()
        return self.results

    def _print(self, text):
        from tqdm import tqdm

        tqdm.write(text)

    def run_one(self, index, run):
        from loadgen import stats

        run_dir = self.root / run.name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "frontend").mkdir(parents=True)
        models = resolve_models(self.cfg.artifacts, self.sweep.model, run.redundancy_mode, run.k, run.encoder)
        namespace = f"{run.experiment_id}-{index}"
        started_at = time.time()
        links_before = self.testbed.link_stats() if self.testbed is not None else None
        dep = start_deployment(
            run, self.launcher, self.placement, models, namespace=namespace,
            log_dir=run_dir / "logs", records_dir=run_dir / "frontend", seed=run.seed * 100 + index,
            tls=_tls_or_none(),
        )
        extra = []
        try:
            clients = [
                self.launcher.start("loadgen", ["serve", "--host", self._bind(self.placement.client(c)),
                                                *_tls_argv()],
                                    name=f"{namespace}-loadgen-{c}", host=self.placement.client(c),
                                    log_path=run_dir / "logs" / f"loadgen-{c}.log")
                for c in range(run.num_clients)
            ]
            extra.extend(clients)
            outcome = asyncio.run(self._load(run, dep, clients, run_dir, namespace, extra))
        finally:
            for started in reversed(extra):
                started.stop()
            dep.stop()
        records = outcome["records"]
        from loadgen.records import write_csv

        write_csv(records, run_dir / "records.csv")
        summary = stats.summarize(records, meta={"run": run.to_dict(), "started_at": started_at})
        queries, groups = stats.load_frontend_records(run_dir / "frontend")
        summary["frontend"] = _frontend_rows(queries, groups)
        summary["background"] = outcome["background"]
        summary["machine_cpu"] = outcome["machine_cpu"]
        summary["network"] = self.network_description()
        if links_before is not None:
            summary["network"]["links"] = _link_deltas(links_before, self.testbed.link_stats(), self.placement)
        stats.write_summary(summary, run_dir / "summary.json")
        return {"run": run, "dir": str(run_dir), "summary": summary,
                "frontend_text": stats.frontend_tables(queries, groups) if run.redundancy_mode == "coded" else ""}

    def _bind(self, host):
        return self.launcher.bind_address(host)

    async def _load(self, run, dep, clients, run_dir, namespace, extra):
        from loadgen import Spec
        from loadgen.control import run_remote_async

        stop_background = await self._start_background(run, dep, run_dir, namespace, extra)
        spec = Spec(target=dep.frontend_address, rate=run.send_rate, num_queries=run.num_queries,
                    warmup_queries=run.warmup_queries, seed=run.seed, deadline_s=run.deadline_s,
                    run_id=namespace)
        done = {}

        def on_progress(client_index, progress):
            done[client_index] = progress.completed
            if self._bar is not None:
                target = self._bar_base + sum(done.values())
                if target > self._bar.n:
                    self._bar.update(target - self._bar.n)

        self._bar_base = self._bar.n if self._bar is not None else 0
        # This machine's CPU during the load, where the services run on it (not on --agents hosts).
        cpu = MachineCpu() if not self.cfg.agents else None
        if cpu is not None:
            cpu.start()
        try:
            result = await run_remote_async([c.address for c in clients], spec, on_progress=on_progress)
        finally:
            machine_cpu = cpu.stop() if cpu is not None else None
            bg_info = await stop_background()
        return {"records": result.records, "background": bg_info, "machine_cpu": machine_cpu}

    async def _start_background(self, run, dep, run_dir, namespace, extra):
        """Starts the run's background; returns an async ``stop() -> info dict``."""
        from deploy.network.background import BackgroundModel, EmulatedBackground
        from deploy.network.shuffle import ShuffleCoordinator

        bg = run.background
        if bg == 0:
            async def stop():
                return {"kind": "none"}
            return stop
        if bg == "clipper":
            return await self._start_clipper(run, dep, run_dir, namespace, extra)
        if self.testbed is None and not self.cfg.agents:
            if run.background_model is None:
                raise cli.Failure(f"no emulated background model: {config_mod.CALIBRATION_PATH} is missing; "
                                  "run `make calibrate` or pass --emulation FILE")
            model = BackgroundModel.from_config(run.background_model)
            emu = EmulatedBackground(dep.instance_addresses(), bg, model, seed=run.seed)
            emu.start()

            async def stop():
                await emu.stop()
                origin = emu.t0 + time.time() - time.monotonic()   # Unix time of its start (clock: monotonic)
                ids = dep.instance_ids()
                tail.write_shuffles(run_dir / tail.SHUFFLES_FILE, [
                    ([ids[t.src]], [ids[t.dst]], origin + t.start_s, origin + t.start_s + t.duration_s)
                    for t in emu.timeline])
                return {"kind": "emulated", "shuffles": bg, "transfers": len(emu.timeline),
                        "busy_fraction": round(emu.busy_fraction(), 4), "errors": emu.errors,
                        "model": run.background_model}
            return stop
        # Real shuffles between agents on the worker hosts.
        hosts = sorted({self.placement.worker(i) for i in range(len(dep.instances))})
        agents = [self.launcher.start("deploy.network.shuffle", ["agent", "--host", self._bind(h)],
                                      name=f"{namespace}-shuffle-{h}", host=h,
                                      log_path=run_dir / "logs" / f"shuffle-{h}.log") for h in hosts]
        extra.extend(agents)
        size = self.testbed.spec.shuffle_bytes if self.testbed is not None else (128 << 20, 256 << 20)
        coordinator = ShuffleCoordinator([a.address for a in agents], bg, size_bytes=tuple(size), seed=run.seed)
        coordinator.start()

        async def stop():
            await coordinator.stop()
            wall = time.time() - time.monotonic()         # the coordinator's clock is time.monotonic
            ids = dep.instance_ids()
            on_host = [[ids[i] for i in range(len(ids)) if self.placement.worker(i) == h] for h in hosts]
            tail.write_shuffles(run_dir / tail.SHUFFLES_FILE, [
                (on_host[t.src], on_host[t.dst], t.start_s + wall, t.end_s + wall) for t in coordinator.timeline])
            s = coordinator.stats
            return {"kind": "shuffles", "shuffles": bg, "completed": s.completed, "failed": s.failed,
                    "bytes_moved": s.bytes_moved, "size_bytes": list(size)}
        return stop

    async def _start_clipper(self, run, dep, run_dir, namespace, extra):
        """A second deployment (mode none) co-located on the first worker hosts."""
        from loadgen import Spec
        from loadgen.control import run_remote_async, stop_remote

        clip = run.clipper
        n = int(clip.get("num_models", 2))
        second = config_mod.RunSpec(**{**run.to_dict(), "redundancy_mode": "none", "num_models": n, "k": 2,
                                       "background": 0})
        models = resolve_models(self.cfg.artifacts, self.sweep.model, "none", run.k, run.encoder)
        # start_deployment blocks (and runs its own event loop): a thread.
        bg_dep = await asyncio.to_thread(
            start_deployment, second, self.launcher, self.placement, models,
            namespace=f"{namespace}-clipper", log_dir=run_dir / "logs" / "clipper",
            records_dir=run_dir / "clipper", seed=run.seed + 7919, tls=_tls_or_none())
        client = self.launcher.start("loadgen", ["serve", "--host", self._bind(self.placement.client(0)),
                                                 *_tls_argv()],
                                     name=f"{namespace}-clipper-loadgen", host=self.placement.client(0),
                                     log_path=run_dir / "logs" / "clipper-loadgen.log")
        extra.append(client)
        spec = Spec(target=bg_dep.frontend_address, rate=float(clip.get("rate", 20.0)), num_queries=0,
                    duration_s=24 * 3600.0, seed=run.seed + 1, deadline_s=run.deadline_s,
                    run_id=f"{namespace}-clipper")
        task = asyncio.create_task(run_remote_async([client.address], spec))

        async def stop():
            await stop_remote([client.address])
            try:
                result = await asyncio.wait_for(task, 30)
                answered = sum(1 for r in result.records if r.ok)
            except Exception as exc:  # noqa: BLE001 - the background's own failure is reported, not fatal
                log.warning("clipper background: %s", exc)
                answered = None
            await asyncio.to_thread(bg_dep.stop)
            return {"kind": "clipper", "rate": clip.get("rate"), "num_models": n, "answered": answered}
        return stop

    def network_description(self):
        if self.testbed is not None:
            return {"kind": "netns", **self.testbed.describe()}
        if self.cfg.agents:
            return {"kind": "hosts", "agents": self.cfg.agents}
        return {"kind": "emulated", "note": "loopback; background load emulated (deploy.network.background)"}

    def format_run(self, result):
        from loadgen import stats

        run = result["run"]
        head = (f"\n== {run.redundancy_mode} | k={run.k} | N={run.num_models} | batch={run.batch_size} | "
                f"rate={run.send_rate:g}/s | background={run.background} | trial {run.trial}")
        text = [head, stats.format_report(result["summary"])]
        if result["frontend_text"]:
            text.append(result["frontend_text"])
        return "\n".join(text)


def _link_deltas(before, after, placement):
    """What each testbed host's shaped link carried during one run (tbf counters)."""
    roles = {placement.frontend: "frontend", **{h: "client" for h in placement.clients}}
    out = []
    for b, a in zip(before, after):
        row = {"host": a.host, "role": roles.get(a.host, "worker"),
               "up_bytes": a.up.bytes - b.up.bytes, "up_drops": a.up.drops - b.up.drops}
        if a.down is not None and b.down is not None:
            row.update(down_bytes=a.down.bytes - b.down.bytes, down_drops=a.down.drops - b.down.drops)
        out.append(row)
    return out


def _frontend_rows(queries, groups):
    from loadgen.stats import latency_row

    enc = [g["encode_us"] for g in groups if g["encode_us"] is not None]
    dec = [g["decode_us"] for g in groups if g["decode_us"] is not None]
    return {
        "queries": len(queries),
        "groups": len(groups),
        "encoding_us": latency_row(enc),
        "decoding_us": latency_row(dec),
    }


def _install_tls(tls_dir, host_addresses):
    """Makes a CA and certificates for the hosts; this process and its children use mutual TLS."""
    from deploy.certs import make_certs
    from services.common import tls as tls_mod

    certs = make_certs(tls_dir, ["127.0.0.1", "localhost", *dict.fromkeys(host_addresses)])
    tls_mod.install(certs.node_tls(client_auth=True))
    print(f"mutual TLS on every gRPC hop (certificates in {tls_dir}/)", flush=True)


def _tls_or_none():
    from services.common import tls as tls_mod

    cfg = tls_mod.current()
    return cfg if cfg.server_enabled else None


def _tls_argv():
    from services.common import tls as tls_mod

    return tls_mod.current().argv()


def build_launcher(cfg, sweep):
    """(launcher, placement, testbed) for the sweep's network."""
    network = cfg.network or sweep.network
    if cfg.agents:
        from deploy.remote.agent import AgentLauncher

        hosts = json.loads(pathlib.Path(cfg.agents).read_text())
        agents = [hosts["frontend"], *hosts["workers"], *hosts["clients"]]
        launcher = AgentLauncher(agents, [a.rpartition(":")[0] for a in agents])
        w, c = len(hosts["workers"]), len(hosts["clients"])
        return launcher, Placement(0, tuple(range(1, 1 + w)), tuple(range(1 + w, 1 + w + c))), None
    if network == "netns":
        from deploy.network import netns

        most = max(sum(r.num_instances) for r in sweep.runs())
        clients = max(sweep.num_clients)
        testbed = netns.Testbed(netns.TestbedSpec(num_hosts=1 + most + clients))
        testbed.up()
        launcher = netns.NetnsLauncher(testbed)
        return launcher, Placement(0, tuple(range(1, 1 + most)), tuple(range(1 + most, 1 + most + clients))), testbed
    return LocalLauncher(), Placement(), None


def choose_network(requested, agents=""):
    """(network, one line saying which and why) for a requested ``auto``/``emulated``/``netns``.

    ``netns`` where it cannot run raises ``cli.Failure`` (one line); ``auto``
    falls back to ``emulated`` and says why.
    """
    from deploy.network import netns, sandbox

    if agents:
        return "hosts", "network: the hosts of --agents"
    if requested == "emulated":
        return "emulated", ("network: emulated (requested): loopback, background shuffles modelled by "
                            "deploy.network.background")
    if sandbox.inside():
        return "netns", ""
    try:
        kind = sandbox.mode()
    except sandbox.SandboxUnavailable as exc:
        try:
            netns.require_netns()
        except netns.TestbedUnavailable:
            if requested == "netns":
                raise cli.Failure(f"the namespace testbed cannot run here: {exc}; "
                                  "run the emulated network instead: make local NETWORK=emulated") from None
            return "emulated", (f"network: emulated, because the namespace testbed cannot run here ({exc}); "
                                "NETWORK=emulated says so explicitly")
        kind = None
    how = sandbox.describe_mode(kind) if kind else "in this process (CAP_NET_ADMIN)"
    return "netns", (f"network: the namespace testbed, real TCP over shaped links, {how} "
                     "(NETWORK=emulated for the emulated model)")


def _main(argv):
    cfg = parse_config(argv)
    cli.setup_logging(cfg.log_level)
    try:
        sweep = config_mod.load(cfg.config)
        if cfg.model:
            sweep = sweep.with_overrides(model=cfg.model)
        if cfg.num_queries:
            sweep = sweep.with_overrides(num_queries=(cfg.num_queries,))
        if cfg.network:
            sweep = sweep.with_overrides(network=cfg.network)
        if cfg.emulation:
            sweep = sweep.with_overrides(background_model=config_mod.load_calibration(cfg.emulation))
        network, line = choose_network(sweep.network, cfg.agents)
        sweep = sweep.with_overrides(network="netns" if network == "netns" else "emulated")
        ensure_models(cfg.artifacts, sweep, build=cfg.build_models)
    except (config_mod.ConfigError, DeploymentError) as exc:
        raise cli.UsageError(str(exc)) from None
    testbed_run = network == "netns"
    if line:
        print(line, flush=True)
    if testbed_run:
        from deploy.network import sandbox

        if not sandbox.inside():
            try:
                kind = sandbox.mode()
            except sandbox.SandboxUnavailable:
                kind = None  # root without user namespaces: the testbed runs in this process
            if kind is not None:
                # The whole run moves into the sandbox, which takes everything
                # it made with it, even on kill -9.
                return sandbox.run_module("deploy.runner.local", [*argv, "--network", "netns"], kind)
        # Testbed results go beside (not over) the emulated ones of the same config.
        sweep = sweep.with_overrides(experiment_id=f"{sweep.experiment_id}-netns")
    previous = signal.signal(signal.SIGTERM, _sigterm)
    launcher = testbed = None
    try:
        launcher, placement, testbed = build_launcher(cfg, sweep)
        if cfg.tls_dir:
            _install_tls(cfg.tls_dir, launcher.host_addresses)
        runner = Sweep(cfg, sweep, launcher, placement, testbed=testbed)
        results = runner.run_all()
        network = runner.network_description()
        twin = None
        if testbed_run and cfg.emulated_twin:
            # The same sweep under the emulated model, right after, so the
            # report can set the two side by side (issue: testbed vs model).
            launcher.stop_all()
            testbed.down()
            launcher = LocalLauncher()
            print("\nthe same sweep on the emulated network, for comparison:", flush=True)
            twin_sweep = sweep.with_overrides(experiment_id="emulated", network="emulated")
            twin_runner = Sweep(dataclasses.replace(cfg, out_dir=str(runner.root)), twin_sweep, launcher,
                                Placement())
            twin_results = twin_runner.run_all()
            twin_network = twin_runner.network_description()
            write_report(twin_runner.root, twin_sweep, twin_results, twin_network)
            twin = (twin_results, twin_network, twin_runner.root)
        report = write_report(runner.root, sweep, results, network, twin=twin)
        modes = list(dict.fromkeys(mode_label(r["run"]) for r in results))
        print("\nCOMPARISON (latency in ms)\n" + format_comparison(comparison(results), modes))
        if twin is not None:
            print("\nEMULATED NETWORK, SAME SWEEP\n" + format_comparison(comparison(twin[0]), modes))
        contended = cpu_contention(results)
        if contended is not None:
            print(f"\nCPU contended: some task waited for a CPU {contended[0]:.1f}% of the time "
                  f"({contended[2]} at {contended[1]:g}/s); these latencies measure this machine's CPU too "
                  "(report.md, \"This machine's CPU during the load\")")
        print(f"\nresults: {runner.root}/  report: {report}")
        return 0
    except KeyboardInterrupt:
        raise
    except cli.Failure:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user, details in the log
        log.debug("sweep failed", exc_info=True)
        raise cli.Failure(f"{type(exc).__name__}: {exc}") from None
    finally:
        if launcher is not None:
            launcher.stop_all()
        if testbed is not None:
            testbed.down()
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
