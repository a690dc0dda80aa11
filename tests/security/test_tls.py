"""TLS and mutual TLS on the gRPC hops; the certificate helper; flag mistakes."""

import asyncio
import logging
import stat
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import certs as certs_mod
from services.common import tls as tls_mod
from services.common.server import create_server, open_channel


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return certs_mod.make_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return certs_mod.make_certs(tmp_path_factory.mktemp("other"), ["127.0.0.1"])


def test_certs_cli_writes_a_ca_and_certificates(tmp_path, capsys):
    assert certs_mod.main(["--out", str(tmp_path), "--hosts", "127.0.0.1,10.0.0.5,node-a"]) == 0
    for name in ("ca.key", "node.key", "client.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    node = x509.load_pem_x509_certificate((tmp_path / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]
    assert node.issuer == ca.subject
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usages} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert "--tls-cert" in capsys.readouterr().out
    assert certs_mod.main(["--out", str(tmp_path), "--days", "0"]) == 2  # a usage mistake
    assert capsys.readouterr().err.strip().count("\n") == 0


async def _check(address, tls):
    async with open_channel(address, tls=tls) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return "OK" if reply.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


def _matrix(server_tls, clients):
    async def body():
        built = create_server("127.0.0.1:0", [], tls=server_tls)
        await built.server.start()
        await built.set_serving(True)
        try:
            return {name: await _check(f"127.0.0.1:{built.port}", t) for name, t in clients.items()}
        finally:
            await built.server.stop(0)
    return asyncio.run(body())


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(certs, other_ca):
    got = _matrix(certs.node_tls(client_auth=True), {
        "mtls": certs.client_tls(client_auth=True),
        "node-as-client": certs.node_tls(client_auth=True),
        "tls-no-cert": certs.client_tls(client_auth=False),
        "plaintext": tls_mod.PLAINTEXT,
        "cert-of-other-ca": tls_mod.TlsConfig(cert=other_ca.client_cert, key=other_ca.client_key,
                                              ca=certs.ca, client_auth=True),
        "trusts-other-ca": other_ca.client_tls(client_auth=True),
    })
    assert got == {"mtls": "OK", "node-as-client": "OK", "tls-no-cert": "UNAVAILABLE",
                   "plaintext": "UNAVAILABLE", "cert-of-other-ca": "UNAVAILABLE",
                   "trusts-other-ca": "UNAVAILABLE"}


def test_server_tls_without_client_auth(certs):
    got = _matrix(certs.node_tls(), {"tls": certs.client_tls(), "plaintext": tls_mod.PLAINTEXT,
                                     "wrong-name": tls_mod.TlsConfig(ca=certs.ca, server_name="elsewhere")})
    assert got == {"tls": "OK", "plaintext": "UNAVAILABLE", "wrong-name": "UNAVAILABLE"}


def test_plaintext_is_the_default_and_is_logged(caplog):
    assert tls_mod.current() == tls_mod.PLAINTEXT
    with caplog.at_level(logging.INFO, logger="services.common.server"):
        assert _matrix(None, {"plain": tls_mod.PLAINTEXT}) == {"plain": "OK"}
    assert any("plaintext" in r.getMessage() and "no TLS" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("module, extra", [
    ("services.frontend", ["--model", "BASE", "--instances", "data=127.0.0.1:1"]),
    ("services.model_server", ["--model", "x.json"]),
    ("services.coder", []),
    ("loadgen", []),
    ("loadgen", ["serve"]),
])
@pytest.mark.parametrize("flags, words", [
    (["--tls-cert", "a.pem"], "--tls-key"),
    (["--tls-ca", "/nonexistent/ca.pem"], "no such file"),
    (["--tls-client-auth"], "--tls-client-auth needs"),
])
def test_tls_flag_mistakes_are_one_line(module, extra, flags, words, tmp_path, request):
    if "BASE" in extra:  # the frontend reads its manifest before anything else
        from deploy.runner.deployment import resolve_models

        base = resolve_models(request.getfixturevalue("tiny_artifacts"), "default", "none", 2, "sum").base
        extra = [base if a == "BASE" else a for a in extra]
    args = extra[:1] + flags + extra[1:] if extra[:1] == ["serve"] else extra + flags
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
