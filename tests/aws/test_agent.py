"""The node agent and AgentLauncher, with real agent processes on loopback."""

import os
import subprocess
import sys

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.remote.agent import AgentError, AgentLauncher, module_allowed
from deploy.runner.launcher import Launcher
from services.common.procs import ServiceProcess, ServiceStartError

FAKE = "tests.aws.fake_service"


@pytest.fixture
def agents(tmp_path):
    procs = []
    try:
        for i in range(2):
            procs.append(ServiceProcess.python_module(
                "deploy.remote.agent",
                ["--host", "127.0.0.1", "--port", "0", "--log-dir", tmp_path / f"agent{i}",
                 "--allow-module", FAKE, "--grace-s", "2"],
                name=f"agent{i}", ready_timeout_s=60,
            ))
        yield procs
    finally:
        for p in procs:
            p.stop(grace_s=10)


def _health(address):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_module_allowlist():
    allowed = ("services", "loadgen", "deploy.network.shuffle")
    assert module_allowed("services.model_server", allowed)
    assert module_allowed("loadgen", allowed)
    assert module_allowed("deploy.network.shuffle", allowed)
    assert not module_allowed("deploy.shufflex", allowed)
    assert not module_allowed("servicesx", allowed)
    assert not module_allowed("os", allowed)
    assert not module_allowed("services; rm -rf /", allowed)
    assert not module_allowed("", allowed)


def test_launcher_starts_reachable_processes_on_each_host(agents):
    launcher = AgentLauncher([f"127.0.0.1:{a.port}" for a in agents])
    assert isinstance(launcher, Launcher)
    with launcher:
        a = launcher.start(FAKE, [], name="svc-a", host=0, env={"PARM_FAKE_MARKER": "x"})
        b = launcher.start(FAKE, [], name="svc-b", host=1)
        assert a.host == 0 and b.host == 1
        assert a.address.startswith("127.0.0.1:") and a.address != b.address
        assert _health(a.address) == health_pb2.HealthCheckResponse.SERVING
        assert _health(b.address) == health_pb2.HealthCheckResponse.SERVING
        # The processes are the agents' children, not ours.
        assert psutil.Process(a.pid).ppid() == agents[0].pid
        assert psutil.Process(b.pid).ppid() == agents[1].pid
        assert a.alive() and b.alive()
        status = launcher.status(0)
        assert [p.name for p in status.processes] == ["svc-a"]
        assert FAKE in status.allowed_modules
        a.kill()
        assert not a.alive()
        assert _gone(a.pid)
        pid_b = b.pid
    # __exit__ -> stop_all: b is stopped too.
    assert _gone(pid_b)


def test_stop_all_is_idempotent_and_stops_in_reverse(agents):
    launcher = AgentLauncher([f"127.0.0.1:{agents[0].port}"], ["10.0.0.7"])
    try:
        first = launcher.start(FAKE, [], name="one")
        second = launcher.start(FAKE, [], name="two")
        assert first.address.startswith("10.0.0.7:")
        launcher.stop_all(grace_s=2)
        launcher.stop_all(grace_s=2)
        assert _gone(first.pid) and _gone(second.pid)
        assert all(not p.alive for p in launcher.status(0).processes)
    finally:
        launcher.close()


def test_refuses_modules_env_and_foreign_pids(agents):
    launcher = AgentLauncher([f"127.0.0.1:{agents[0].port}"])
    try:
        with pytest.raises(ServiceStartError, match="not allowed"):
            launcher.start("http.server", [], name="web")
        with pytest.raises(ServiceStartError, match="LD_PRELOAD"):
            launcher.start(FAKE, [], name="x", env={"LD_PRELOAD": "/tmp/evil.so"})
        from parm.v1 import agent_pb2
        with pytest.raises(AgentError) as info:
            launcher._call(0, "Signal", agent_pb2.AgentSignalRequest(pid=os.getpid(), signal=9))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert psutil.pid_exists(os.getpid())
        assert launcher.status(0).processes == []
    finally:
        launcher.close()


def test_failed_start_reports_the_log_tail(agents):
    launcher = AgentLauncher([f"127.0.0.1:{agents[0].port}"])
    try:
        with pytest.raises(ServiceStartError, match="failing on purpose"):
            launcher.start(FAKE, ["--fail"], name="bad", ready_timeout_s=30)
    finally:
        launcher.close()


def test_agent_sigterm_stops_its_children(agents):
    launcher = AgentLauncher([f"127.0.0.1:{agents[1].port}"])
    try:
        child = launcher.start(FAKE, [], name="orphan-to-be")
        assert agents[1].stop(grace_s=10) == 0
        assert _gone(child.pid)
    finally:
        launcher.close()


def test_agent_usage_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "deploy.remote.agent", "--port", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("python -m deploy.remote.agent: error: argument --port")
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def tls_agent(tmp_path):
    from deploy.certs import make_certs
    from deploy.remote.agent import TLS_SERVER_NAME

    make_certs(tmp_path / "tls", hosts=(TLS_SERVER_NAME,))
    tls = tmp_path / "tls"
    proc = ServiceProcess.python_module(
        "deploy.remote.agent",
        ["--host", "127.0.0.1", "--port", "0", "--log-dir", tmp_path / "agent", "--allow-module", FAKE,
         "--tls-cert", tls / "node.pem", "--tls-key", tls / "node.key", "--tls-ca", tls / "ca.pem",
         "--tls-client-auth"],
        name="tls-agent", ready_timeout_s=60,
    )
    try:
        yield proc, tls
    finally:
        proc.stop(grace_s=10)


def test_agent_under_mutual_tls_admits_only_the_deployments_certificates(tls_agent, tmp_path, monkeypatch):
    from deploy.certs import make_certs
    from deploy.remote.agent import TLS_DIR_ENV, TLS_SERVER_NAME, tls_from_dir

    proc, tls = tls_agent
    address = f"127.0.0.1:{proc.port}"
    # With the deployment's CA and node key (from the env, as the runner on AWS gets it): served.
    monkeypatch.setenv(TLS_DIR_ENV, str(tls))
    launcher = AgentLauncher([address], rpc_timeout_s=10)
    try:
        assert launcher.status(0).processes == []
    finally:
        launcher.close()
    # Plaintext: refused.
    monkeypatch.delenv(TLS_DIR_ENV)
    plain = AgentLauncher([address], rpc_timeout_s=3)
    try:
        with pytest.raises(AgentError) as info:
            plain.status(0)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        plain.close()
    # A certificate of another CA (another deployment): refused.
    make_certs(tmp_path / "other", hosts=(TLS_SERVER_NAME,))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, src in (("ca.pem", tls / "ca.pem"), ("node.pem", tmp_path / "other" / "node.pem"),
                      ("node.key", tmp_path / "other" / "node.key")):
        (mixed / name).write_bytes(src.read_bytes())
    foreign = AgentLauncher([address], rpc_timeout_s=3, tls=tls_from_dir(str(mixed)))
    try:
        with pytest.raises(AgentError):
            foreign.status(0)
    finally:
        foreign.close()


def test_tls_from_dir_without_a_ca_is_plaintext(tmp_path):
    from deploy.remote.agent import tls_from_dir

    assert tls_from_dir("") is None
    assert tls_from_dir(str(tmp_path)) is None


def test_gpu_agent_forces_the_cuda_provider_on_model_servers(tmp_path, monkeypatch):
    from deploy.remote import agent as agent_mod

    started = []

    class Recorder:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.pid, self.port = 4242 + len(started), 1

    monkeypatch.setattr(agent_mod, "ServiceProcess", Recorder)
    core = agent_mod.AgentCore(log_dir=tmp_path, model_server_provider="cuda")
    core.start("services.model_server", ["--model", "m.json", "--provider", "auto"], "ms", {}, 10)
    core.start("services.model_server", ["--provider=cpu", "--role", "data"], "ms2", {}, 10)
    core.start("loadgen", ["--provider", "x"], "lg", {}, 10)
    assert started[0][3:] == ["--model", "m.json", "--provider", "cuda", "--port", "0"]
    assert started[1][3:] == ["--role", "data", "--provider", "cuda", "--port", "0"]
    assert started[2][3:] == ["--provider", "x", "--port", "0"]  # only model servers
    plain = agent_mod.AgentCore(log_dir=tmp_path)
    plain.start("services.model_server", ["--provider", "auto"], "ms3", {}, 10)
    assert started[3][3:] == ["--provider", "auto", "--port", "0"]
