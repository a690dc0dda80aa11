"""A local deployment with mutual TLS on every hop and an AUTH-only registry;
no secret in any log, record or output."""

import asyncio
import socket
import subprocess
import sys

import psutil
import pytest

from deploy import certs as certs_mod
from deploy.reliability import rig as rig_mod

pytestmark = pytest.mark.slow


def _registry_reply(address, payload):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(payload)
        return s.recv(256)


def test_mtls_deployment_serves_only_certified_clients_and_leaks_no_password(tiny_artifacts, tmp_path):
    certs = certs_mod.make_certs(tmp_path / "certs", ["127.0.0.1"])
    node = certs.node_tls(client_auth=True)
    spec = rig_mod.run_spec(mode="coded", num_models=2, compute_ms=1.0)
    rig = rig_mod.start_rig(tiny_artifacts, spec, tmp_path / "run", with_coder=True, tls=node)
    password = rig.dep.registry_url.split("://:", 1)[1].split("@", 1)[0]
    outputs = []
    try:
        address = rig.dep.frontend_address
        client_flags = ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key, "--tls-ca", certs.ca,
                        "--tls-client-auth"]
        run = subprocess.run([sys.executable, "-m", "loadgen", "--target", address, "--rate", "60",
                              "--num-queries", "40", "--warmup-queries", "4", "--no-progress",
                              "--out", str(tmp_path / "run" / "loadgen"), *client_flags],
                             capture_output=True, text=True, timeout=120)
        outputs += [run.stdout, run.stderr]
        assert run.returncode == 0, run.stderr
        assert "E2E_LATENCY" in run.stdout

        # without a client certificate, or in plaintext, nothing gets through
        plain = subprocess.run([sys.executable, "-m", "loadgen", "--target", address, "--num-queries", "2",
                                "--no-progress"], capture_output=True, text=True, timeout=60)
        outputs += [plain.stdout, plain.stderr]
        assert plain.returncode == 1 and "no frontend at" in plain.stderr

        status = asyncio.run(_status(address, certs.client_tls(client_auth=True)))
        assert status.counters["encodes"] > 0 and status.counters["encode_errors"] == 0  # coder hop, mTLS
        assert sum(i.healthy for i in status.instances) == 3  # instance hops, mTLS

        # the registry: loopback only, and nothing without AUTH
        reg = psutil.Process(rig.dep.registry.pid)
        listening = {c.laddr.ip for p in [reg, *reg.children(recursive=True)]
                     for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        assert _registry_reply(rig.dep.registry.address, b"*1\r\n$4\r\nPING\r\n").startswith(b"-NOAUTH")
        assert _registry_reply(rig.dep.registry.address, b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n").startswith(b"-")

        # the password is on no command line (ps), of any process of the deployment
        procs = [psutil.Process(s.pid) for s in [rig.dep.frontend, rig.dep.registry, rig.coder]
                 + [s for _, s in rig.dep.instances]]
        procs += [c for p in procs for c in p.children(recursive=True)]
        assert len(procs) >= 7
        assert not [p.cmdline() for p in procs if password in " ".join(p.cmdline())]
    finally:
        rig.stop()
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").glob("*.log")}
    assert "mutual TLS" in logs["frontend.log"]
    assert all("mutual TLS" in logs[f"{r}.log"] for r in ("data-0", "data-1", "parity-2"))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "certs" not in p.parts]
    assert len(files) >= 8
    leaks = [str(p) for p in files if password in p.read_text(errors="replace")]
    leaks += [f"output {i}" for i, text in enumerate(outputs) if password in text]
    assert not leaks, leaks


async def _status(address, tls):
    from parm.v1 import frontend_pb2, frontend_pb2_grpc
    from services.common.server import open_channel

    async with open_channel(address, tls=tls) as ch:
        return await frontend_pb2_grpc.FrontendStub(ch).GetStatus(frontend_pb2.GetStatusRequest(), timeout=5)


def test_registry_password_is_redacted_in_errors():
    from services.common.registry import redact_url

    assert redact_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://***@10.0.0.1:6379/0"
    assert redact_url("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"


def test_registry_password_moves_between_url_and_environment():
    from services.common.registry import split_password, url_with_env_password

    assert split_password("redis://:pw1@127.0.0.1:7/0") == ("redis://127.0.0.1:7/0", "pw1")
    assert split_password("redis://127.0.0.1:7/0") == ("redis://127.0.0.1:7/0", None)
    env = {"PARM_REGISTRY_PASSWORD": "pw2"}
    assert url_with_env_password("redis://127.0.0.1:7/0", env) == "redis://:pw2@127.0.0.1:7/0"
    assert url_with_env_password("redis://:own@127.0.0.1:7/0", env) == "redis://:own@127.0.0.1:7/0"
    assert url_with_env_password("redis://127.0.0.1:7/0", {}) == "redis://127.0.0.1:7/0"
    assert url_with_env_password(None, env) is None
