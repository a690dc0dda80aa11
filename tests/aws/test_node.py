"""On-node parts against moto: the stdlib S3 client, ready reports, the sweep runner, results."""

import io
import json

import pytest

from deploy.aws import bootstrap, cli, node, storage
from deploy.aws.session import Clients
from deploy.aws.settings import AwsSettings
from services.common.procs import ServiceProcess
from tests.aws.conftest import REGION, read_json_object

BUCKET = "parm-test-bucket"


@pytest.fixture
def launcher(aws):
    """The launching user's clients (full access to the bucket)."""
    c = Clients(AwsSettings(region=REGION, endpoint_url=aws["url"], bucket=BUCKET))
    storage.ensure_bucket(c, BUCKET)
    return c


@pytest.fixture
def clients(aws, launcher):
    """Clients that get S3's answers to the node role: a GET or HEAD of a missing key is 403, not 404
    (its ListBucket is scoped by an s3:prefix condition; moto answers 404)."""
    from botocore.exceptions import ClientError

    c = Clients(AwsSettings(region=REGION, endpoint_url=aws["url"], bucket=BUCKET))
    raw = aws["client"]("s3")

    def missing_is_forbidden(model, params, **_):
        try:
            raw.head_object(Bucket=params["Bucket"], Key=params["Key"])
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                                  model.name) from None

    c.s3.meta.events.register("before-parameter-build.s3.GetObject", missing_is_forbidden)
    c.s3.meta.events.register("before-parameter-build.s3.HeadObject", missing_is_forbidden)
    return c


@pytest.fixture
def s3(clients, aws):
    """The node's standard-library S3 client (what boots and ready reports use)."""
    return bootstrap.S3(BUCKET, REGION, endpoint_url=aws["url"], expected_owner=aws["account"])


@pytest.fixture
def agent(tmp_path):
    proc = ServiceProcess.python_module("deploy.remote.agent", ["--host", "127.0.0.1", "--port", "0", "--log-dir",
                                                                tmp_path / "agent"], name="agent", ready_timeout_s=60)
    try:
        yield proc
    finally:
        proc.stop(grace_s=10)


def test_sigv4_matches_botocore():
    """The stdlib signer signs exactly as botocore does (GET with a query, PUT with a body, session token)."""
    import datetime

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    creds = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token/with+chars=")
    for method, url, body in (
        ("GET", "http://parm-b.s3.us-east-1.amazonaws.com/?list-type=2&prefix=exp%2Fready%2F", b""),
        ("GET", "http://parm-b.s3.us-east-1.amazonaws.com/exp/dist/parm-0.1.0%2Blocal.whl", b""),
        ("PUT", "http://parm-b.s3.us-east-1.amazonaws.com/exp/ready/i-1.json", b'{"state": "failed"}'),
    ):
        import hashlib

        payload = hashlib.sha256(body).hexdigest()
        theirs = AWSRequest(method=method, url=url, data=body,
                            headers={"x-amz-expected-bucket-owner": "123456789012"})
        S3SigV4Auth(Credentials(*creds), "s3", "us-east-1").add_auth(theirs)
        when = datetime.datetime.strptime(theirs.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        ours = {"x-amz-expected-bucket-owner": "123456789012", "x-amz-security-token": creds[2]}
        bootstrap.sign_v4(method, url, ours, payload, region="us-east-1", access_key=creds[0],
                          secret_key=creds[1], now=when)
        assert ours["Authorization"] == theirs.headers["Authorization"], (method, url)


def test_upload_and_bootstrap_download_round_trip(launcher, s3, tmp_path):
    clients = launcher
    wheel = tmp_path / "parm-0.1.0-cp310-cp310-linux_x86_64.whl"
    wheel.write_bytes(bytes(range(256)) * 100)
    source = tmp_path / "parm-src.tar.gz"
    source.write_bytes(b"source")
    art = tmp_path / "artifacts"
    (art / "m").mkdir(parents=True)
    (art / "m" / "model.onnx").write_bytes(b"\x00\x01" * 5000)
    (art / "top.json").write_text("{}")
    release = storage.upload_release(clients, BUCKET, "exp", wheel, source)
    assert release == {"wheel": "exp/dist/" + wheel.name, "source": "exp/dist/parm-src.tar.gz"}
    assert storage.upload_dir(clients, BUCKET, "exp/artifacts", art) == (2, 0)
    assert storage.upload_dir(clients, BUCKET, "exp/artifacts", art) == (0, 2)  # unchanged: skipped
    (art / "top.json").write_text('{"changed": 1}')
    assert storage.upload_dir(clients, BUCKET, "exp/artifacts", art) == (1, 1)
    storage.put_json(clients, BUCKET, "exp/tls/node.key", {"k": 1})

    dest = tmp_path / "node"
    got = bootstrap.fetch(s3, "exp", str(dest))
    assert got == {"wheel": str(dest / "dist" / wheel.name), "source": str(dest / "dist" / "parm-src.tar.gz"),
                   "artifacts": 2, "tls": 1}
    assert (dest / "dist" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (dest / "artifacts" / "m" / "model.onnx").read_bytes() == b"\x00\x01" * 5000
    assert json.loads((dest / "artifacts" / "top.json").read_text()) == {"changed": 1}
    assert (dest / "tls" / "node.key").stat().st_mode & 0o777 == 0o600


def test_stdlib_s3_lists_every_page(s3, clients):
    for i in range(7):
        clients.s3.put_object(Bucket=BUCKET, Key=f"many/k{i:04d}", Body=b"")
    clients.s3.put_object(Bucket=BUCKET, Key="manyx", Body=b"")
    assert s3.list("many/", page_size=3) == [f"many/k{i:04d}" for i in range(7)]


def test_bootstrap_cli_fetch_and_failure_report(launcher, aws, tmp_path, capsys):
    clients = launcher
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"w")
    storage.upload_release(clients, BUCKET, "exp", wheel, None)
    common = ["--bucket", BUCKET, "--experiment", "exp", "--region", REGION, "--endpoint-url", aws["url"],
              "--bucket-owner", aws["account"]]
    assert bootstrap.main(["fetch", *common, "--dest", str(tmp_path / "d")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"wheel": str(tmp_path / "d" / "dist" / "w.whl"), "source": None, "artifacts": 0, "tls": 0}
    log = tmp_path / "boot.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "E: Could not get lock /var/lib/dpkg/lock\n")
    assert bootstrap.main(["report", *common, "--role", "worker", "--instance-id", "i-9",
                           "--reason", "boot failed at step 'apt-get' (exit 100)", "--log", str(log)]) == 0
    report = read_json_object(clients.s3, BUCKET, "exp/ready/i-9.json")
    assert (report["state"], report["role"], report["reason"]) == ("failed", "worker",
                                                                   "boot failed at step 'apt-get' (exit 100)")
    tail = report["log_tail"].splitlines()
    assert len(tail) == bootstrap.LOG_TAIL_LINES and tail[-1] == "E: Could not get lock /var/lib/dpkg/lock"
    # A missing release is one line and exit 1, not a traceback.
    assert bootstrap.main(["fetch", *common[:3], "nothing-here", *common[4:], "--dest", str(tmp_path / "e")]) == 1
    assert capsys.readouterr().err.startswith("bootstrap.py: error: GET s3://parm-test-bucket/nothing-here/dist/")


def test_ready_report_waits_for_the_agent(clients, s3, agent):
    report = node.report_ready(s3, "exp", role="worker", instance_id="i-1", private_ip="127.0.0.1",
                               agent_port=agent.port, wait_s=30)
    assert report["state"] == "ready" and report["agent"] == f"127.0.0.1:{agent.port}"
    assert report["execution_provider"] == "CPUExecutionProvider" and report["boot_id"]
    assert read_json_object(clients.s3, BUCKET, "exp/ready/i-1.json")["role"] == "worker"
    failed = node.report_ready(s3, "exp", role="client", instance_id="i-2", private_ip="127.0.0.1",
                               agent_port=1, wait_s=0.5)
    assert failed["state"] == "failed" and "did not answer" in failed["reason"]


def test_gpu_ready_fails_loudly_without_cuda(clients, s3, agent, tmp_path):
    """Item 3: on this CPU-only machine a GPU worker's ready check fails, naming the provider."""
    report = node.report_ready(s3, "exp", role="worker", instance_id="i-g", private_ip="127.0.0.1",
                               agent_port=agent.port, wait_s=30, require_provider="cuda", artifacts=str(tmp_path))
    assert report["state"] == "failed"
    assert report["reason"].startswith("the CUDA provider is not available")
    assert read_json_object(clients.s3, BUCKET, "exp/ready/i-g.json")["state"] == "failed"


def test_cuda_fallback_to_cpu_is_detected(tmp_path, monkeypatch):
    """ONNX Runtime lists CUDA but the session runs on CPU (libraries missing): a failure, not a warning."""
    import onnxruntime as ort

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"x")

    class FellBack:
        def __init__(self, path, providers):
            assert providers[0] == node.CUDA

        def get_providers(self):
            return ["CPUExecutionProvider"]

    class OnCuda(FellBack):
        def get_providers(self):
            return [node.CUDA, "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: [node.CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    provider, problem = node.check_provider("cuda", str(tmp_path))
    assert provider == "CPUExecutionProvider" and "fell back to CPUExecutionProvider" in problem
    monkeypatch.setattr(ort, "InferenceSession", OnCuda)
    assert node.check_provider("cuda", str(tmp_path)) == (node.CUDA, None)


FAKE_SWEEP = (
    "{python} -c \"import json, pathlib, sys; cfg = json.load(open(sys.argv[1])); "
    "hosts = json.load(open(sys.argv[2])); out = pathlib.Path(sys.argv[3]) / cfg['experiment_id']; "
    "out.mkdir(parents=True); (out / 'report.md').write_text('E2E_LATENCY (ms) for ' + str(len(hosts['workers']))"
    " + ' workers'); open(sys.argv[4], 'a').write('run\\n'); print('swept')\" {config} {hosts} {out} RUNS"
)


def _request(clients, agent_port, command, request_id="20260101T000000Z", instances=None, ready=True, **extra):
    instances = instances or {"frontend": ["i-f"], "worker": ["i-w1", "i-w2"], "client": ["i-c"]}
    storage.put_json(clients, BUCKET, "simple/fleet.json", {
        "experiment_id": "simple", "agent_port": agent_port, "instances": instances, "market": "on-demand",
        "roles": {"frontend": ["127.0.0.1"], "worker": ["127.0.0.1", "127.0.0.1"], "client": ["127.0.0.1"]}})
    if ready:
        for role, ids in instances.items():
            for i in ids:
                storage.put_json(clients, BUCKET, f"simple/ready/{i}.json", {
                    "instance_id": i, "role": role, "state": "ready", "private_ip": f"10.0.0.{len(i)}",
                    "execution_provider": "CUDAExecutionProvider" if role == "worker" else None})
    storage.put_json(clients, BUCKET, "simple/control/request.json", {
        "id": request_id, "config": {"experiment_id": "simple"}, "command": command,
        "keep_running": True, **extra})


def _runner(clients, tmp_path, **kw):
    kw.setdefault("agent_wait_s", 30)
    return node.SweepRunner(node.RunnerConfig(
        bucket=BUCKET, experiment_id="simple", region=REGION, work_dir=str(tmp_path / "runs"),
        artifacts="/opt/parm/artifacts", endpoint_url=clients.settings.endpoint_url, poll_s=0.2,
        upload_backoff_s=0.05, **kw), clients)


def test_runner_without_a_request_waits(clients, tmp_path):
    assert _runner(clients, tmp_path).run_once() is None  # a 403 for the missing request is no error


def test_runner_runs_the_request_once_and_uploads_results(clients, agent, tmp_path, capsys):
    runs = tmp_path / "runs.txt"
    _request(clients, agent.port, FAKE_SWEEP.replace("RUNS", str(runs)))
    runner = _runner(clients, tmp_path)
    assert runner.run_once() == "20260101T000000Z"
    assert runner.run_once() is None  # done: not run again
    assert runs.read_text() == "run\n"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "done" and status["returncode"] == 0 and status["uploaded"] is True
    assert status["execution_providers"] == {"10.0.0.4": "CUDAExecutionProvider"}
    hosts = read_json_object(clients.s3, BUCKET, "simple/results/20260101T000000Z/hosts.json")
    assert hosts == {"frontend": f"127.0.0.1:{agent.port}", "workers": [f"127.0.0.1:{agent.port}"] * 2,
                     "clients": [f"127.0.0.1:{agent.port}"]}
    nodes = read_json_object(clients.s3, BUCKET, "simple/results/20260101T000000Z/nodes.json")
    assert [n["instance_id"] for n in nodes] == ["i-w1", "i-w2", "i-c", "i-f"]
    log = clients.s3.get_object(Bucket=BUCKET, Key="simple/results/20260101T000000Z/runner.log")["Body"].read()
    assert log == b"swept\n"

    # `results` downloads and prints them.
    out = io.StringIO()
    rc = cli.main(["results", "simple", "--bucket", BUCKET, "--out", str(tmp_path / "dl")], out=out)
    assert rc == 0, capsys.readouterr().err
    text = out.getvalue()
    assert text.startswith("sweep 20260101T000000Z: done (returncode 0)\n")
    assert "== results/simple/report.md\nE2E_LATENCY (ms) for 2 workers" in text
    assert (tmp_path / "dl" / "simple" / "20260101T000000Z" / "results" / "simple" / "report.md").exists()


def _deny_head_and_fail_puts(clients, failures):
    """Real AWS under the node role: HEAD of a missing key is 403 (prefix-scoped ListBucket); PUTs of
    results fail ``failures`` times first (throttling, network)."""
    from botocore.exceptions import ClientError

    calls = {"head": 0, "put": 0}

    def head(params, **kwargs):
        calls["head"] += 1
        raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")

    def put(params, **kwargs):
        if "/results/" in params.get("Key", "") and calls["put"] < failures:
            calls["put"] += 1
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate"}},
                              "PutObject")

    clients.s3.meta.events.register("before-parameter-build.s3.HeadObject", head)
    clients.s3.meta.events.register("before-parameter-build.s3.PutObject", put)
    return calls


def test_upload_trouble_never_reruns_a_finished_sweep(clients, agent, tmp_path):
    """Item 2: 403 on HEAD and failing PUTs: the sweep ran once, is recorded finished, uploads retry."""
    runs = tmp_path / "runs.txt"
    _request(clients, agent.port, FAKE_SWEEP.replace("RUNS", str(runs)))
    calls = _deny_head_and_fail_puts(clients, failures=3)
    runner = _runner(clients, tmp_path, upload_attempts=2)
    assert runner.run_once() == "20260101T000000Z"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert (status["state"], status.get("outcome")) == ("uploading", "done"), status  # recorded before uploading
    assert "20260101T000000Z" in runner.done_ids()
    # The next polls retry the upload only; the sweep is never run again.
    for _ in range(3):
        runner.run_once()
    assert runs.read_text() == "run\n"
    assert calls["head"] == 0  # the node never relies on HEAD
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert (status["state"], status["uploaded"]) == ("done", True)
    assert read_json_object(clients.s3, BUCKET, "simple/results/20260101T000000Z/hosts.json")["workers"]
    # A restarted runner (a reboot) does not run it either.
    assert _runner(clients, tmp_path).run_once() is None
    assert runs.read_text() == "run\n"


def test_stopped_runner_records_interrupted_not_done(clients, agent, tmp_path):
    """Item 5: stopping the runner mid-sweep (reboot/stop) does not mark the sweep finished."""
    import threading

    _request(clients, agent.port, "{python} -c 'import time; time.sleep(60)'")
    runner = _runner(clients, tmp_path)
    threading.Timer(1.5, runner.stop.set).start()
    assert runner.run_once() == "20260101T000000Z"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "interrupted"
    assert runner.done_ids() == set()


def test_runner_waits_for_ready_reports_of_this_boot(clients, agent, tmp_path):
    """Item 5: a node without a ready report (deleted by the launcher before its restart) holds the sweep."""
    runs = tmp_path / "runs.txt"
    _request(clients, agent.port, FAKE_SWEEP.replace("RUNS", str(runs)))
    clients.s3.delete_object(Bucket=BUCKET, Key="simple/ready/i-w2.json")
    runner = _runner(clients, tmp_path, agent_wait_s=1)
    assert runner.run_once() == "20260101T000000Z"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "failed" and "no ready report after 1 s from: i-w2" in status["reason"]
    assert not runs.exists()


def test_a_failed_node_fails_the_sweep_with_its_reason(clients, agent, tmp_path):
    _request(clients, agent.port, FAKE_SWEEP.replace("RUNS", str(tmp_path / "r")))
    storage.put_json(clients, BUCKET, "simple/ready/i-w1.json", {"instance_id": "i-w1", "state": "failed",
                                                                 "reason": "boot failed at step 'apt-get'"})
    assert _runner(clients, tmp_path).run_once() == "20260101T000000Z"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["reason"] == "node(s) failed to boot: i-w1: boot failed at step 'apt-get'"


def test_fleet_stops_itself_after_the_sweep(clients, aws, agent, tmp_path):
    """Item 7: unless keep_running, the runner stops the fleet once results are up, itself last."""
    ec2 = clients.ec2
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=aws["ubuntu_ami"], MinCount=3, MaxCount=3,
                                                     InstanceType="t3.micro")["Instances"]]
    order = []
    ec2.meta.events.register("before-parameter-build.ec2.StopInstances",
                             lambda params, **kw: order.append(list(params["InstanceIds"])))
    _request(clients, agent.port, FAKE_SWEEP.replace("RUNS", str(tmp_path / "r")), keep_running=False,
             instances={"frontend": [ids[0]], "worker": [ids[1]], "client": [ids[2]]})
    assert _runner(clients, tmp_path, instance_id=ids[0]).run_once() == "20260101T000000Z"
    assert order == [[ids[1], ids[2]], [ids[0]]]
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
              for i in r["Instances"]}
    assert set(states.values()) <= {"stopping", "stopped"}


def test_runner_reports_a_failed_sweep_and_unreachable_agents(clients, agent, tmp_path, capsys):
    _request(clients, agent.port, "{python} -c 'import sys; sys.exit(4)'", "r1")
    assert _runner(clients, tmp_path, agent_wait_s=1).run_once() == "r1"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert (status["id"], status["state"], status["returncode"]) == ("r1", "failed", 4)
    _request(clients, 1, FAKE_SWEEP, "r2")  # nothing listens on port 1
    assert _runner(clients, tmp_path, agent_wait_s=1).run_once() == "r2"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "failed" and "agents not answering after 1 s: 127.0.0.1:1" in status["reason"]
    out = io.StringIO()
    assert cli.main(["results", "simple", "--bucket", BUCKET, "--out", str(tmp_path / "dl")], out=out) == 0
    assert out.getvalue().startswith("sweep r2: failed (reason agents not answering")


def test_results_without_a_request_is_an_error(clients, tmp_path, capsys):
    assert cli.main(["results", "simple", "--bucket", BUCKET], out=io.StringIO()) == 1
    assert capsys.readouterr().err == (f"python -m deploy.aws: error: no sweep of experiment simple was requested "
                                       f"in s3://{BUCKET}\n")


def test_node_cli_usage_error(capsys):
    assert node.main(["ready", "--bucket", "b"]) == 2
    assert capsys.readouterr().err.startswith("python -m deploy.aws.node: error: the following arguments are required")


@pytest.mark.parametrize("code, details, retried", [
    ("UNAVAILABLE", "failed to connect to all addresses; last error: connection refused", True),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", True),
    ("UNAVAILABLE", "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: certificate verify failed", False),
    ("UNIMPLEMENTED", "Method not found!", False),
])
def test_waiting_for_agents_retries_only_not_up_yet(monkeypatch, code, details, retried):
    """A TLS or protocol mismatch fails at once with its real error instead of waiting out the timeout."""
    import grpc

    from deploy.aws.session import AwsError
    from deploy.remote import agent as agent_mod

    calls = []

    class Unreachable:
        def __init__(self, addresses, **kw):
            self.addresses = addresses

        def status(self, i):
            calls.append(self.addresses[i])
            raise agent_mod.AgentError(f"agent {self.addresses[i]}: Status failed: {code}: {details}",
                                       getattr(grpc.StatusCode, code))

        def close(self):
            pass

    monkeypatch.setattr(agent_mod, "AgentLauncher", Unreachable)
    if retried:
        assert node.wait_for_agents(["10.0.0.5:7070"], timeout_s=0.3, poll_s=0.05) == ["10.0.0.5:7070"]
        assert len(calls) >= 3
    else:
        with pytest.raises(AwsError, match=details.split(":")[0][:20]):
            node.wait_for_agents(["10.0.0.5:7070"], timeout_s=30, poll_s=0.05)
        assert len(calls) == 1
