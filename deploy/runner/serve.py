"""``python -m deploy.runner.serve [CONFIG]``: one deployment, kept up (``make serve``).

Takes the first run of the config (default ``configs/serve.json``: coded,
k=2), starts it on this machine with the frontend on ``--port`` (default
50051, the load generator's default target), prints the addresses, and keeps
it up until Ctrl-C or SIGTERM, then stops every process.
"""

import pathlib
import signal
import sys
import threading

from deploy.runner import config as config_mod
from deploy.runner.deployment import DeploymentError, Placement, describe, ensure_models, resolve_models, start_deployment
from deploy.runner.launcher import LocalLauncher
from deploy.runner.local import resolve_config_path
from services.common import cli

DEFAULT_PORT = 50051
PROG = "python -m deploy.runner.serve"


def parse_config(argv):
    p = cli.ArgumentParser(prog=PROG, description="Start one deployment (the first run of a config) and keep it up.")
    p.add_argument("config", nargs="?", default="configs/serve.json", help="sweep config, or its name: serve")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="frontend port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=0, help="frontend Prometheus port (0 = any free)")
    p.add_argument("--artifacts", default="artifacts", help="directory with the models")
    p.add_argument("--logs", default="results/serve", help="where the processes' logs and records go")
    a = p.parse_args(argv)
    if not 0 <= a.port < 65536:
        p.error(f"--port {a.port} is out of range")
    a.config = resolve_config_path(a.config)
    return a


def _main(argv):
    a = parse_config(argv)
    try:
        sweep = config_mod.load(a.config)
        ensure_models(a.artifacts, sweep)
        run = sweep.runs()[0]
        models = resolve_models(a.artifacts, sweep.model, run.redundancy_mode, run.k, run.encoder)
    except (config_mod.ConfigError, DeploymentError) as exc:
        raise cli.UsageError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    launcher = LocalLauncher()
    logs = pathlib.Path(a.logs)
    try:
        dep = start_deployment(run, launcher, Placement(), models, namespace="serve", log_dir=logs / "logs",
                               records_dir=logs / "frontend", seed=run.seed, frontend_port=a.port,
                               metrics_port=a.metrics_port)
        print(f"ParM deployment up: mode {run.redundancy_mode}, k={run.k}, N={run.num_models}, "
              f"batch {run.batch_size}")
        print(describe(dep))
        print(f"frontend: {dep.frontend_address}   try: .venv/bin/python -m loadgen --target "
              f"{dep.frontend_address} --rate 20 --num-queries 500")
        print("Ctrl-C to stop.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    except (DeploymentError, OSError, RuntimeError) as exc:
        raise cli.Failure(str(exc)) from None
    finally:
        launcher.stop_all()


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
