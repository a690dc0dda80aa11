"""On-node parts against moto: bootstrap download, ready reports, the sweep runner, results."""

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
def clients(aws):
    c = Clients(AwsSettings(region=REGION, endpoint_url=aws["url"], bucket=BUCKET))
    storage.ensure_bucket(c, BUCKET)
    return c


@pytest.fixture
def agent(tmp_path):
    proc = ServiceProcess.python_module("deploy.remote.agent", ["--host", "127.0.0.1", "--port", "0", "--log-dir",
                                                         tmp_path / "agent"], name="agent", ready_timeout_s=60)
    try:
        yield proc
    finally:
        proc.stop(grace_s=10)


def test_upload_and_bootstrap_download_round_trip(clients, tmp_path):
    wheel = tmp_path / "parm-0.1.0-cp311-cp311-linux_x86_64.whl"
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

    dest = tmp_path / "node"
    got = bootstrap.fetch(clients.s3, BUCKET, "exp", str(dest))
    assert got == {"wheel": str(dest / "dist" / wheel.name), "source": str(dest / "dist" / "parm-src.tar.gz"),
                   "artifacts": 2}
    assert (dest / "dist" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (dest / "artifacts" / "m" / "model.onnx").read_bytes() == b"\x00\x01" * 5000
    assert json.loads((dest / "artifacts" / "top.json").read_text()) == {"changed": 1}


def test_bootstrap_as_the_boot_script_runs_it(clients, aws, tmp_path, capsys):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"w")
    storage.upload_release(clients, BUCKET, "exp", wheel, None)
    assert bootstrap.main(["--bucket", BUCKET, "--experiment", "exp", "--dest", str(tmp_path / "d"),
                           "--region", REGION, "--endpoint-url", aws["url"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"wheel": str(tmp_path / "d" / "dist" / "w.whl"), "source": None, "artifacts": 0}


def test_ready_report_waits_for_the_agent(clients, agent):
    report = node.report_ready(clients, BUCKET, "exp", role="worker", instance_id="i-1", private_ip="127.0.0.1",
                               agent_port=agent.port, wait_s=30)
    assert report["state"] == "ready" and report["agent"] == f"127.0.0.1:{agent.port}"
    assert read_json_object(clients.s3, BUCKET, "exp/ready/i-1.json")["role"] == "worker"
    failed = node.report_ready(clients, BUCKET, "exp", role="client", instance_id="i-2", private_ip="127.0.0.1",
                               agent_port=1, wait_s=0.5)
    assert failed["state"] == "failed" and "did not answer" in failed["reason"]


FAKE_SWEEP = (
    "{python} -c \"import json, pathlib, sys; cfg = json.load(open(sys.argv[1])); "
    "hosts = json.load(open(sys.argv[2])); out = pathlib.Path(sys.argv[3]) / cfg['experiment_id']; "
    "out.mkdir(parents=True); (out / 'report.md').write_text('E2E_LATENCY (ms) for ' + str(len(hosts['workers']))"
    " + ' workers'); print('swept')\" {config} {hosts} {out}"
)


def _request(clients, agent_port, command, request_id="20260101T000000Z"):
    storage.put_json(clients, BUCKET, "simple/fleet.json", {
        "experiment_id": "simple", "agent_port": agent_port,
        "roles": {"frontend": ["127.0.0.1"], "worker": ["127.0.0.1", "127.0.0.1"], "client": ["127.0.0.1"]}})
    storage.put_json(clients, BUCKET, "simple/control/request.json", {
        "id": request_id, "config": {"experiment_id": "simple"}, "command": command})


def test_runner_runs_the_request_once_and_uploads_results(clients, agent, tmp_path):
    _request(clients, agent.port, FAKE_SWEEP)
    runner = node.SweepRunner(node.RunnerConfig(
        bucket=BUCKET, experiment_id="simple", region=REGION, work_dir=str(tmp_path / "runs"),
        artifacts="/opt/parm/artifacts", endpoint_url=clients.settings.endpoint_url, agent_wait_s=30), clients)
    assert runner.run_once() == "20260101T000000Z"
    assert runner.run_once() is None  # done: not run again
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "done" and status["returncode"] == 0
    hosts = read_json_object(clients.s3, BUCKET, "simple/results/20260101T000000Z/hosts.json")
    assert hosts == {"frontend": f"127.0.0.1:{agent.port}", "workers": [f"127.0.0.1:{agent.port}"] * 2,
                     "clients": [f"127.0.0.1:{agent.port}"]}
    log = clients.s3.get_object(Bucket=BUCKET, Key="simple/results/20260101T000000Z/runner.log")["Body"].read()
    assert log == b"swept\n"

    # `results` downloads and prints them.
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["results", "simple", "--bucket", BUCKET, "--out", str(tmp_path / "dl")], out=out, err=err)
    assert rc == 0, err.getvalue()
    text = out.getvalue()
    assert text.startswith("sweep 20260101T000000Z: done (returncode 0)\n")
    assert "== results/simple/report.md\nE2E_LATENCY (ms) for 2 workers" in text
    assert (tmp_path / "dl" / "simple" / "20260101T000000Z" / "results" / "simple" / "report.md").exists()


def test_runner_reports_a_failed_sweep_and_unreachable_agents(clients, agent, tmp_path):
    cfg = node.RunnerConfig(bucket=BUCKET, experiment_id="simple", region=REGION, work_dir=str(tmp_path / "r"),
                            artifacts="a", endpoint_url=clients.settings.endpoint_url, agent_wait_s=1)
    _request(clients, agent.port, "{python} -c 'import sys; sys.exit(4)'", "r1")
    assert node.SweepRunner(cfg, clients).run_once() == "r1"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert (status["id"], status["state"], status["returncode"]) == ("r1", "failed", 4)
    _request(clients, 1, FAKE_SWEEP, "r2")  # nothing listens on port 1
    assert node.SweepRunner(cfg, clients).run_once() == "r2"
    status = read_json_object(clients.s3, BUCKET, "simple/control/status.json")
    assert status["state"] == "failed" and "agents not answering after 1 s: 127.0.0.1:1" in status["reason"]
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["results", "simple", "--bucket", BUCKET, "--out", str(tmp_path / "dl")], out=out, err=err) == 0
    assert out.getvalue().startswith("sweep r2: failed (reason agents not answering")


def test_results_without_a_request_is_an_error(clients, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["results", "simple", "--bucket", BUCKET], out=out, err=err) == 1
    assert err.getvalue() == f"deploy.aws: no sweep of experiment simple was requested in s3://{BUCKET}\n"


def test_node_cli_usage_error(capsys):
    assert node.main(["ready", "--bucket", "b"]) == 2
    assert capsys.readouterr().err.startswith("deploy.aws.node: the following arguments are required")
