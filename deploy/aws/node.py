"""What runs on the instances: ready reports and the sweep runner.

``python -m deploy.aws.node ready ...`` (every node, end of boot): waits
until the local node agent answers, then writes
``EXPERIMENT/ready/<instance-id>.json`` (``state`` "ready", or "failed"
with the reason).

``python -m deploy.aws.node runner ...`` (frontend node, a systemd unit):
polls ``EXPERIMENT/control/request.json``; for a request it has not run
yet it

1. writes the request's config and ``hosts.json`` (``{"frontend",
   "workers", "clients"}`` agent addresses, from ``fleet.json``);
2. waits until every agent of the fleet answers (nodes boot at different
   speeds);
3. runs the sweep command (the request's ``command``, from
   ``AwsSettings.runner_command``; by default
   ``python -m deploy.runner.local CONFIG --agents hosts.json --out OUT ...``),
   which drives the model servers, shuffle agents and load generators
   through the agents;
4. uploads ``OUT`` and the runner's log to ``EXPERIMENT/results/<id>/``
   and records ``control/status.json`` (``running`` -> ``done`` with the exit
   code, or ``failed`` with the reason).

So the sweep survives the launching machine going away; ``python -m
deploy.aws results`` fetches what it wrote. Done request ids are kept in
``WORK_DIR/done.txt`` so that a restart does not rerun a sweep.
"""

import argparse
import json
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from deploy.aws import storage
from deploy.aws.session import AwsError, Clients
from deploy.aws.settings import DEFAULT_RUNNER_COMMAND, AwsSettings


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def wait_for_agents(addresses, timeout_s, poll_s=2.0, stop=None):
    """Waits until every agent answers ``Status`` -> list of those that never did."""
    from deploy.remote.agent import AgentError, AgentLauncher

    pending = list(addresses)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline and not (stop and stop.is_set()):
        launcher = AgentLauncher(pending, rpc_timeout_s=min(5.0, poll_s + 3))
        try:
            still = []
            for i, address in enumerate(pending):
                try:
                    launcher.status(i)
                except AgentError:
                    still.append(address)
        finally:
            launcher.close()
        pending = still
        if pending:
            time.sleep(poll_s)
    return pending


def hosts_from_fleet(fleet):
    """``hosts.json`` for ``deploy.runner.local --agents`` from ``fleet.json``."""
    port = fleet["agent_port"]
    by_role = {role: [f"{ip}:{port}" for ip in fleet["roles"].get(role, [])] for role in ("frontend", "worker", "client")}
    if len(by_role["frontend"]) != 1:
        raise AwsError(f"fleet.json names {len(by_role['frontend'])} frontends, expected 1")
    return {"frontend": by_role["frontend"][0], "workers": by_role["worker"], "clients": by_role["client"]}


@dataclass(frozen=True)
class RunnerConfig:
    bucket: str
    experiment_id: str
    region: str
    work_dir: str
    artifacts: str
    endpoint_url: str | None = None
    command: str = DEFAULT_RUNNER_COMMAND
    poll_s: float = 10.0
    agent_wait_s: float = 1800.0


class SweepRunner:
    """Runs the sweep requests of one experiment (see the module doc)."""

    def __init__(self, cfg, clients=None):
        self.cfg = cfg
        self.clients = clients or Clients(AwsSettings(region=cfg.region, endpoint_url=cfg.endpoint_url))
        self.work_dir = pathlib.Path(cfg.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.done_path = self.work_dir / "done.txt"
        self.stop = threading.Event()

    def _key(self, *parts):
        return storage.key(self.cfg.experiment_id, *parts)

    def done_ids(self):
        return set(self.done_path.read_text().split()) if self.done_path.exists() else set()

    def _status(self, request_id, state, **extra):
        storage.put_json(self.clients, self.cfg.bucket, self._key("control", "status.json"),
                         {"id": request_id, "state": state, "time": now_iso(), **extra})

    def run_once(self):
        """Runs the pending request, if any -> its id, or None."""
        request = storage.get_json(self.clients, self.cfg.bucket, self._key("control", "request.json"))
        if not request or request.get("id") in self.done_ids():
            return None
        request_id = request["id"]
        run_dir = self.work_dir / request_id
        out_dir = run_dir / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "runner.log"
        try:
            config_path = run_dir / "config.json"
            config_path.write_text(json.dumps(request["config"], indent=1))
            fleet = storage.get_json(self.clients, self.cfg.bucket, self._key("fleet.json"))
            if fleet is None:
                raise AwsError("no fleet.json in the experiment's prefix")
            hosts = hosts_from_fleet(fleet)
            hosts_path = run_dir / "hosts.json"
            hosts_path.write_text(json.dumps(hosts, indent=1))
            self._status(request_id, "waiting for agents")
            missing = wait_for_agents([hosts["frontend"], *hosts["workers"], *hosts["clients"]],
                                      self.cfg.agent_wait_s, stop=self.stop)
            if missing:
                raise AwsError(f"agents not answering after {self.cfg.agent_wait_s:.0f} s: {', '.join(missing)}")
            template = request.get("command") or self.cfg.command
            argv = shlex.split(template.format(
                python=shlex.quote(sys.executable), config=shlex.quote(str(config_path)),
                hosts=shlex.quote(str(hosts_path)), out=shlex.quote(str(out_dir)),
                artifacts=shlex.quote(self.cfg.artifacts),
            ))
            self._status(request_id, "running", command=argv)
            rc = self._run(argv, log_path)
            state, extra = ("done" if rc == 0 else "failed"), {"returncode": rc}
        except (AwsError, OSError, KeyError, ValueError) as exc:
            state, extra = "failed", {"reason": str(exc)}
            with open(log_path, "a") as log:
                log.write(f"runner: {exc}\n")
        storage.upload_dir(self.clients, self.cfg.bucket, self._key("results", request_id), run_dir)
        self._status(request_id, state, **extra)
        with open(self.done_path, "a") as f:
            f.write(request_id + "\n")
        return request_id

    def _run(self, argv, log_path):
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    if self.stop.wait(1.0):
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(timeout=60)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return proc.returncode

    def run_forever(self):
        while not self.stop.is_set():
            try:
                self.run_once()
            except AwsError as exc:
                print(f"runner: {exc}", file=sys.stderr, flush=True)
            self.stop.wait(self.cfg.poll_s)


def report_ready(clients, bucket, experiment_id, *, role, instance_id, private_ip, agent_port, wait_s=300.0):
    """Waits for the local agent and writes the ready report -> the report dict."""
    agent = f"{private_ip}:{agent_port}"
    missing = wait_for_agents([agent], wait_s)
    report = {"instance_id": instance_id, "role": role, "private_ip": private_ip, "agent": agent,
              "time": now_iso(), "state": "ready" if not missing else "failed",
              }
    if missing:
        report["reason"] = f"the node agent at {agent} did not answer within {wait_s:.0f} s"
    storage.put_json(clients, bucket, storage.key(experiment_id, "ready", f"{instance_id}.json"), report)
    return report


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_config(argv):
    p = _Parser(prog="python -m deploy.aws.node", description="On-node helpers of an AWS experiment.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("ready", "runner"):
        s = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--bucket", required=True)
        s.add_argument("--experiment", required=True)
        s.add_argument("--region", required=True)
        s.add_argument("--endpoint-url", default=None, help="AWS endpoint override (tests)")
    ready = sub.choices["ready"]
    ready.add_argument("--role", required=True, choices=("frontend", "worker", "client"))
    ready.add_argument("--instance-id", required=True)
    ready.add_argument("--private-ip", required=True)
    ready.add_argument("--agent-port", type=int, required=True)
    ready.add_argument("--wait-s", type=float, default=300.0, help="how long to wait for the local agent, s")
    runner = sub.choices["runner"]
    runner.add_argument("--work-dir", required=True)
    runner.add_argument("--artifacts", required=True)
    runner.add_argument("--command", dest="runner_command", default=DEFAULT_RUNNER_COMMAND,
                        help="sweep command template")
    runner.add_argument("--poll-s", type=float, default=10.0, help="request polling period, s")
    runner.add_argument("--agent-wait-s", type=float, default=1800.0, help="how long to wait for the agents, s")
    runner.add_argument("--once", action="store_true", help="run the pending request (if any) and exit")
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse_config(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"deploy.aws.node: {exc}", file=sys.stderr)
        return 2
    clients = Clients(AwsSettings(region=args.region, endpoint_url=args.endpoint_url))
    try:
        if args.command == "ready":
            report = report_ready(clients, args.bucket, args.experiment, role=args.role,
                                  instance_id=args.instance_id, private_ip=args.private_ip,
                                  agent_port=args.agent_port, wait_s=args.wait_s)
            print(json.dumps(report))
            return 0 if report["state"] == "ready" else 1
        runner = SweepRunner(RunnerConfig(
            bucket=args.bucket, experiment_id=args.experiment, region=args.region, work_dir=args.work_dir,
            artifacts=args.artifacts, endpoint_url=args.endpoint_url, command=args.runner_command,
            poll_s=args.poll_s, agent_wait_s=args.agent_wait_s,
        ), clients)
        if args.once:
            print(runner.run_once() or "no pending request")
            return 0
        signal.signal(signal.SIGTERM, lambda *_: runner.stop.set())
        runner.run_forever()
        return 0
    except AwsError as exc:
        print(f"deploy.aws.node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
