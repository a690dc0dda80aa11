"""The image's helpers for the manifests: parm-grpc-probe (probes under mutual
TLS) and parm-fetch-models (the models-fetch init container)."""

import io
import json
import pathlib
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROBE = str(ROOT / "kubernetes" / "bin" / "parm-grpc-probe")
FETCH = str(ROOT / "kubernetes" / "bin" / "parm-fetch-models")


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _tarball(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_fetch_models_extracts_a_tarball(tmp_path):
    manifest = json.dumps({"name": "m"}).encode()
    _tarball(tmp_path / "a.tar.gz", [_file("m.json", manifest), _file("m.onnx", b"\x08\x01"),
                                     _file("sub/n.json", b"{}")])
    proc = run(FETCH, (tmp_path / "a.tar.gz").as_uri(), str(tmp_path / "models"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"parm-fetch-models: 1 manifests into {tmp_path / 'models'}: m.json"
    assert (tmp_path / "models" / "m.json").read_bytes() == manifest
    assert (tmp_path / "models" / "m.onnx").read_bytes() == b"\x08\x01"
    assert (tmp_path / "models" / "sub" / "n.json").read_bytes() == b"{}"


@pytest.mark.parametrize("member, reason", [
    (_file("../evil.json", b"x"), "outside the destination"),
    (_file("/abs.json", b"x"), "outside the destination"),
])
def test_fetch_models_refuses_paths_outside(tmp_path, member, reason):
    _tarball(tmp_path / "bad.tar.gz", [_file("ok.json", b"{}"), member])
    proc = run(FETCH, (tmp_path / "bad.tar.gz").as_uri(), str(tmp_path / "models"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and reason in proc.stderr
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "models" / "ok.json").exists()


def test_fetch_models_refuses_links_and_bad_urls(tmp_path):
    link = tarfile.TarInfo("l.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tarball(tmp_path / "l.tar.gz", [(link, None)])
    proc = run(FETCH, (tmp_path / "l.tar.gz").as_uri(), str(tmp_path / "models"))
    assert proc.returncode == 1 and "only regular files and directories" in proc.stderr
    proc = run(FETCH, "ftp://host/x.tar.gz", str(tmp_path / "models"))
    assert proc.returncode == 1 and "unsupported URL scheme 'ftp'" in proc.stderr
    proc = run(FETCH, (tmp_path / "missing.tar.gz").as_uri(), str(tmp_path / "models"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.fixture
def coder(tmp_path):
    """A real coder service (plaintext, or mutual TLS with ``tls`` certs)."""
    procs = []

    def start(*extra):
        ready = tmp_path / f"ready-{len(procs)}.json"
        proc = subprocess.Popen([sys.executable, "-m", "services.coder", "--port", "0", "--ready-file", str(ready),
                                 *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "coder did not start"
            time.sleep(0.1)
        return json.loads(ready.read_text())["port"]

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()


def test_probe_plaintext(coder):
    port = coder()
    proc = run(PROBE, f"127.0.0.1:{port}")
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = run(PROBE, "--service", "no.such.Service", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and proc.stderr.startswith(f"parm-grpc-probe: 127.0.0.1:{port}: NOT_FOUND")


def test_probe_nothing_listening():
    from services.common.registry import free_port

    port = free_port()
    proc = run(PROBE, "--timeout-s", "0.5", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"parm-grpc-probe: 127.0.0.1:{port}: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_probe_under_mutual_tls(coder, tmp_path):
    from deploy.certs import make_certs

    certs = make_certs(tmp_path / "certs", hosts=("parm-internal",))
    tls = ["--tls-cert", certs.node_cert, "--tls-key", certs.node_key, "--tls-ca", certs.ca, "--tls-client-auth"]
    port = coder(*tls)
    proc = run(PROBE, *tls, "--tls-server-name", "parm-internal", f"127.0.0.1:{port}")
    assert (proc.returncode, proc.stderr) == (0, "")
    # the kubelet's plaintext probe cannot see it: why the tls component uses this probe
    proc = run(PROBE, "--timeout-s", "1", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr
