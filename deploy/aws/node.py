"""What runs on the instances: ready reports and the sweep runner.

``python -m deploy.aws.node ready ...`` (every node, end of boot): waits
until the local node agent answers and, with ``--require-provider cuda``
(GPU workers), until ONNX Runtime really runs a model of the artifacts on
the CUDA provider; then writes ``EXPERIMENT/ready/<instance-id>.json``
(``state`` "ready", or "failed" with the reason; this boot's id; the
execution provider in use). It writes with the standard-library S3 client
of ``deploy.aws.bootstrap``, so workers and clients need no boto3.

``python -m deploy.aws.node runner ...`` (frontend node, a systemd unit):
polls ``EXPERIMENT/control/request.json``; for a request it has not
finished yet it

1. writes the request's config and ``hosts.json`` (``{"frontend",
   "workers", "clients"}`` agent addresses, from ``fleet.json``);
2. waits until every instance of ``fleet.json`` has a ready report (the
   launcher deletes the reports of the instances it starts, so a report
   present is of this boot) and every agent answers; a node that reported
   ``failed`` fails the sweep with its reason;
3. runs the sweep command (the request's ``command``, from
   ``AwsSettings.runner_command``), which drives the model servers, shuffle
   agents and load generators through the agents (mutual TLS with the
   deployment's CA: ``PARM_AGENT_TLS_DIR``);
4. records the sweep as finished (``WORK_DIR/done.txt`` and
   ``control/status.json``) *before* uploading, so nothing re-runs a
   finished sweep; a sweep interrupted by a stop of the runner (a reboot,
   a stopped instance) is recorded ``interrupted``, not finished;
5. uploads the results folder to ``EXPERIMENT/results/<id>/`` with retries
   and backoff, on its own (plain PUTs: no HEAD, which the node role's
   prefix-scoped ``ListBucket`` answers 403 for a missing key); uploads
   still pending are retried at every poll and after a reboot;
6. unless the request says ``keep_running``, stops the fleet (terminates
   it, for spot), itself last, once the results are uploaded (or the
   upload retries are spent: the results stay on the frontend's volume and
   a later boot uploads them).
"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from deploy.aws import bootstrap, storage
from deploy.aws.session import AwsError, Clients, aws_errors
from deploy.aws.settings import DEFAULT_RUNNER_COMMAND, AwsSettings
from services.common import cli

ACTIVE_STATES = ("waiting for nodes", "running", "uploading")
CUDA = "CUDAExecutionProvider"


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def agent_tls(tls_dir=None):
    """The ``TlsConfig`` to call the agents with: mutual TLS from ``tls_dir``
    (default ``$PARM_AGENT_TLS_DIR``) when it holds ``ca.pem``, else None."""
    from deploy.remote.agent import tls_from_dir

    return tls_from_dir(tls_dir if tls_dir is not None else os.environ.get("PARM_AGENT_TLS_DIR", ""))


def wait_for_agents(addresses, timeout_s, poll_s=2.0, stop=None, tls=None):
    """Waits until every agent answers ``Status`` -> list of those that never did.

    Only "not up yet" is retried (``services.common.polls``); any other
    failure (a TLS mismatch, a protocol error) raises ``AwsError`` at once.
    """
    from deploy.remote.agent import AgentError, AgentLauncher
    from services.common.polls import status_not_up_yet

    pending = list(addresses)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline and not (stop and stop.is_set()):
        launcher = AgentLauncher(pending, rpc_timeout_s=min(5.0, poll_s + 3), tls=tls)
        try:
            still = []
            for i, address in enumerate(pending):
                try:
                    launcher.status(i)
                except AgentError as exc:
                    if not status_not_up_yet(exc.code, str(exc)):
                        raise AwsError(str(exc)) from None
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


def fleet_instance_ids(fleet):
    return [i for role in ("worker", "client", "frontend") for i in fleet.get("instances", {}).get(role, [])]


@dataclass(frozen=True)
class RunnerConfig:
    bucket: str
    experiment_id: str
    region: str
    work_dir: str
    artifacts: str
    endpoint_url: str | None = None
    bucket_owner: str | None = None
    instance_id: str = ""
    command: str = DEFAULT_RUNNER_COMMAND
    poll_s: float = 10.0
    agent_wait_s: float = 1800.0
    upload_attempts: int = 8
    upload_backoff_s: float = 5.0
    tls_dir: str | None = None


class SweepRunner:
    """Runs the sweep requests of one experiment (see the module doc)."""

    def __init__(self, cfg, clients=None):
        self.cfg = cfg
        self.clients = clients or Clients(AwsSettings(region=cfg.region, endpoint_url=cfg.endpoint_url,
                                                      bucket_owner=cfg.bucket_owner))
        self.work_dir = pathlib.Path(cfg.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.done_path = self.work_dir / "done.txt"
        self.pending_path = self.work_dir / "uploads-pending.txt"
        self.stop = threading.Event()
        self.tls = agent_tls(cfg.tls_dir)

    def _key(self, *parts):
        return storage.key(self.cfg.experiment_id, *parts)

    @staticmethod
    def _ids(path):
        return path.read_text().split() if path.exists() else []

    def done_ids(self):
        return set(self._ids(self.done_path))

    def _append(self, path, request_id):
        with open(path, "a") as f:
            f.write(request_id + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _get_if_present(self, *parts):
        """The JSON at ``EXP/parts``, or None. Lists first: under the node role a GET of a missing key is
        403 (AccessDenied), not 404, because its ``ListBucket`` is scoped by a prefix condition."""
        object_key = self._key(*parts)
        if object_key not in storage.list_keys(self.clients, self.cfg.bucket, object_key):
            return None
        return storage.get_json(self.clients, self.cfg.bucket, object_key)

    def _status(self, request_id, state, **extra):
        storage.put_json(self.clients, self.cfg.bucket, self._key("control", "status.json"),
                         {"id": request_id, "state": state, "time": now_iso(), **extra})

    def wait_for_nodes(self, fleet):
        """Waits for a ready report of every instance of ``fleet`` -> their reports (``AwsError`` on failed ones)."""
        ids = fleet_instance_ids(fleet)
        deadline = time.monotonic() + self.cfg.agent_wait_s
        while True:
            present = set(storage.list_keys(self.clients, self.cfg.bucket, self._key("ready") + "/"))
            reports = {i: storage.get_json(self.clients, self.cfg.bucket, self._key("ready", f"{i}.json"))
                       if self._key("ready", f"{i}.json") in present else None for i in ids}
            failed = {i: r for i, r in reports.items() if r and r.get("state") == "failed"}
            if failed:
                raise AwsError("node(s) failed to boot: " + "; ".join(
                    f"{i}: {r.get('reason', '?')}" for i, r in sorted(failed.items())))
            missing = sorted(i for i, r in reports.items() if not r)
            if not missing:
                return reports
            if time.monotonic() >= deadline or self.stop.is_set():
                raise AwsError(f"no ready report after {self.cfg.agent_wait_s:.0f} s from: {', '.join(missing)}")
            self.stop.wait(min(self.cfg.poll_s, 5.0))

    def run_once(self):
        """Finishes pending uploads; runs the pending request, if any -> its id, or None."""
        self.flush_uploads()
        request = self._get_if_present("control", "request.json")
        if not request or request.get("id") in self.done_ids():
            return None
        request_id = request["id"]
        run_dir = self.work_dir / request_id
        out_dir = run_dir / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "runner.log"
        fleet = None
        try:
            config_path = run_dir / "config.json"
            config_path.write_text(json.dumps(request["config"], indent=1))
            fleet = self._get_if_present("fleet.json")
            if fleet is None:
                raise AwsError("no fleet.json in the experiment's prefix")
            hosts = hosts_from_fleet(fleet)
            hosts_path = run_dir / "hosts.json"
            hosts_path.write_text(json.dumps(hosts, indent=1))
            self._status(request_id, "waiting for nodes")
            reports = self.wait_for_nodes(fleet)
            nodes = [reports[i] for i in fleet_instance_ids(fleet)]
            (run_dir / "nodes.json").write_text(json.dumps(nodes, indent=1))
            providers = {r.get("private_ip", r.get("instance_id")): r.get("execution_provider")
                         for r in nodes if r.get("role") == "worker"}
            missing = wait_for_agents([hosts["frontend"], *hosts["workers"], *hosts["clients"]],
                                      self.cfg.agent_wait_s, stop=self.stop, tls=self.tls)
            if missing:
                raise AwsError(f"agents not answering after {self.cfg.agent_wait_s:.0f} s: {', '.join(missing)}")
            template = request.get("command") or self.cfg.command
            argv = shlex.split(template.format(
                python=shlex.quote(sys.executable), config=shlex.quote(str(config_path)),
                hosts=shlex.quote(str(hosts_path)), out=shlex.quote(str(out_dir)),
                artifacts=shlex.quote(self.cfg.artifacts),
            ))
            self._status(request_id, "running", command=argv, execution_providers=providers)
            rc = self._run(argv, log_path)
            state, extra = ("done" if rc == 0 else "failed"), {"returncode": rc, "execution_providers": providers}
        except (AwsError, OSError, KeyError, ValueError) as exc:
            state, extra = "failed", {"reason": str(exc)}
            with open(log_path, "a") as log:
                log.write(f"runner: {exc}\n")
        if self.stop.is_set():
            # Stopped (reboot, instance stop): not finished; a later boot may run it again.
            self._status(request_id, "interrupted", **extra)
            return request_id
        # Finished: recorded before anything that can fail, so it never runs twice.
        self._append(self.done_path, request_id)
        self._append(self.pending_path, request_id)
        (run_dir / "outcome.json").write_text(json.dumps({"state": state, **extra}))
        self._status(request_id, "uploading", outcome=state, **extra)
        uploaded = self.flush_uploads()
        if not request.get("keep_running") and fleet is not None and not self.stop.is_set():
            self.stop_fleet(fleet, uploaded=request_id in uploaded)
        return request_id

    def flush_uploads(self):
        """Uploads the results of finished sweeps still pending -> the ids uploaded now."""
        pending = list(dict.fromkeys(self._ids(self.pending_path)))
        done = []
        for request_id in pending:
            run_dir = self.work_dir / request_id
            if not run_dir.is_dir():
                done.append(request_id)
                continue
            if self._upload_with_retries(request_id, run_dir):
                done.append(request_id)
                outcome = json.loads((run_dir / "outcome.json").read_text()) if (run_dir / "outcome.json").exists() else {}
                self._status(request_id, outcome.pop("state", "done"), uploaded=True, **outcome)
        if done:
            left = [i for i in pending if i not in done]
            tmp = self.pending_path.with_suffix(".tmp")
            tmp.write_text("".join(f"{i}\n" for i in left))
            os.replace(tmp, self.pending_path)
        return done

    def _upload_with_retries(self, request_id, run_dir):
        delay = self.cfg.upload_backoff_s
        for attempt in range(1, self.cfg.upload_attempts + 1):
            try:
                storage.upload_dir(self.clients, self.cfg.bucket, self._key("results", request_id), run_dir,
                                   skip_unchanged=False)
                return True
            except AwsError as exc:
                print(f"runner: uploading the results of {request_id} (attempt {attempt}): {exc}",
                      file=sys.stderr, flush=True)
                if attempt == self.cfg.upload_attempts or self.stop.wait(delay):
                    return False
                delay = min(delay * 2, 300.0)
        return False

    def stop_fleet(self, fleet, *, uploaded):
        """Stops (spot: terminates) the fleet's instances, this one last."""
        ids = fleet_instance_ids(fleet)
        others = [i for i in ids if i != self.cfg.instance_id]
        me = [i for i in ids if i == self.cfg.instance_id]
        spot = fleet.get("market") == "spot"
        verb = "terminating" if spot else "stopping"
        print(f"runner: sweep finished (results {'uploaded' if uploaded else 'kept on this node'}); "
              f"{verb} the fleet: {', '.join(ids)}", file=sys.stderr, flush=True)
        with aws_errors(f"{verb} the fleet: "):
            for group in (others, me):
                if not group:
                    continue
                if spot:
                    self.clients.ec2.terminate_instances(InstanceIds=group)
                else:
                    self.clients.ec2.stop_instances(InstanceIds=group)

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


def check_provider(required, artifacts):
    """The ONNX Runtime execution provider this node runs models with -> (provider or None, problem or None).

    With ``required == "cuda"``: CUDA must be available *and* a session on a
    model of ``artifacts`` must really use it (ONNX Runtime falls back to CPU
    with only a warning when CUDA/cuDNN libraries are missing).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ("onnxruntime is not installed" if required else None)
    available = ort.get_available_providers()
    if required != "cuda":
        return (CUDA if CUDA in available else "CPUExecutionProvider"), None
    if CUDA not in available:
        return "CPUExecutionProvider", f"the CUDA provider is not available (available: {', '.join(available)})"
    models = sorted(pathlib.Path(artifacts).rglob("*.onnx")) if artifacts else []
    if not models:
        return CUDA, f"no .onnx model under {artifacts} to check that the CUDA provider really loads"
    try:
        session = ort.InferenceSession(str(models[0]), providers=[CUDA, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the reason to report
        return None, f"loading {models[0].name} with CUDA failed: {' '.join(str(exc).split())[:300]}"
    in_use = session.get_providers()[0]
    if in_use != CUDA:
        return in_use, (f"ONNX Runtime fell back to {in_use} for {models[0].name}: the CUDA/cuDNN libraries "
                        "were not found (check LD_LIBRARY_PATH and the gpu extra's nvidia packages)")
    return in_use, None


def report_ready(s3, experiment_id, *, role, instance_id, private_ip, agent_port, wait_s=300.0, tls=None,
                 require_provider=None, artifacts=None):
    """Waits for the local agent (and the provider check) and writes the ready report -> the report dict.

    ``s3`` is a ``deploy.aws.bootstrap.S3`` (standard library; no boto3 on the node).
    """
    agent = f"{private_ip}:{agent_port}"
    provider, problem = check_provider(require_provider, artifacts)
    try:
        missing = wait_for_agents([agent], wait_s, tls=tls) if problem is None else []
    except AwsError as exc:
        missing, problem = [], f"the node agent at {agent} refused: {exc}"
    if missing:
        problem = f"the node agent at {agent} did not answer within {wait_s:.0f} s"
    report = {"instance_id": instance_id, "role": role, "private_ip": private_ip, "agent": agent,
              "time": now_iso(), "boot_id": bootstrap.boot_id(), "state": "failed" if problem else "ready",
              "execution_provider": provider, "python": ".".join(map(str, sys.version_info[:3]))}
    if problem:
        report["reason"] = problem
    s3.put(storage.key(experiment_id, "ready", f"{instance_id}.json"), json.dumps(report, indent=1).encode(),
           "application/json")
    return report


def build_parser():
    p = cli.ArgumentParser(prog="python -m deploy.aws.node", description="On-node helpers of an AWS experiment.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    for name in ("ready", "runner"):
        s = sub.add_parser(name)
        s.add_argument("--bucket", required=True)
        s.add_argument("--experiment", required=True)
        s.add_argument("--region", required=True)
        s.add_argument("--bucket-owner", default=None, help="expected owner account of the bucket")
        s.add_argument("--endpoint-url", default=None, help="AWS endpoint override (tests)")
    ready = sub.choices["ready"]
    ready.add_argument("--role", required=True, choices=("frontend", "worker", "client"))
    ready.add_argument("--instance-id", required=True)
    ready.add_argument("--private-ip", required=True)
    ready.add_argument("--agent-port", type=int, required=True)
    ready.add_argument("--wait-s", type=float, default=300.0, help="how long to wait for the local agent, s")
    ready.add_argument("--tls-dir", default=None, help="the deployment's CA and node key (mutual TLS to the agent)")
    ready.add_argument("--artifacts", default=None, help="models to check the execution provider with")
    ready.add_argument("--require-provider", choices=("cuda",), default=None,
                       help="fail unless ONNX Runtime really runs a model on this provider")
    runner = sub.choices["runner"]
    runner.add_argument("--work-dir", required=True)
    runner.add_argument("--artifacts", required=True)
    runner.add_argument("--instance-id", default="", help="this instance (stopped last)")
    runner.add_argument("--command", dest="runner_command", default=DEFAULT_RUNNER_COMMAND,
                        help="sweep command template")
    runner.add_argument("--poll-s", type=float, default=10.0, help="request polling period, s")
    runner.add_argument("--agent-wait-s", type=float, default=1800.0, help="how long to wait for the nodes, s")
    runner.add_argument("--once", action="store_true", help="run the pending request (if any) and exit")
    return p


def _main(argv):
    args = build_parser().parse_args(argv)
    cli.setup_logging("WARNING")
    if args.command == "ready":
        s3 = bootstrap.S3(args.bucket, args.region, endpoint_url=args.endpoint_url, expected_owner=args.bucket_owner)
        report = report_ready(s3, args.experiment, role=args.role, instance_id=args.instance_id,
                              private_ip=args.private_ip, agent_port=args.agent_port, wait_s=args.wait_s,
                              tls=agent_tls(args.tls_dir or ""), require_provider=args.require_provider,
                              artifacts=args.artifacts)
        print(json.dumps(report))
        return 0 if report["state"] == "ready" else 1
    clients = Clients(AwsSettings(region=args.region, endpoint_url=args.endpoint_url, bucket_owner=args.bucket_owner))
    runner = SweepRunner(RunnerConfig(
        bucket=args.bucket, experiment_id=args.experiment, region=args.region, work_dir=args.work_dir,
        artifacts=args.artifacts, endpoint_url=args.endpoint_url, bucket_owner=args.bucket_owner,
        instance_id=args.instance_id, command=args.runner_command, poll_s=args.poll_s,
        agent_wait_s=args.agent_wait_s,
    ), clients)
    if args.once:
        print(runner.run_once() or "no pending request")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: runner.stop.set())
    runner.run_forever()
    return 0


def main(argv=None):
    return cli.run_main(_main, argv, prog="python -m deploy.aws.node",
                        runtime_errors=(AwsError, bootstrap.S3Error, OSError))


if __name__ == "__main__":
    sys.exit(main())
