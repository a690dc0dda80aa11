"""A real run of the image under `podman kube play` (slow; needs podman and
`make image`): registry, two data and one parity model server, the frontend
(coded, k=2, concat) and the load generator Job, each its own pod from the
rendered manifests, on one internal pod network (no route out), the models
in a podman volume standing for the parm-models PVC, the records in another
for parm-results. Two variants: plaintext, and mutual TLS with the coder
service (the TLS Secret's files in a third volume). Everything a run creates
is removed afterwards."""

import csv
import io
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tarfile
import time

import numpy as np
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = "localhost/parm:0.1.0"
CONF = str(ROOT / "kubernetes" / "containers.conf")
ENV = dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", CONF))
NUM_QUERIES, WARMUP = 60, 10
UID = 10001  # the image's user

# GetStatus from inside the frontend's pod (TLS flags as argv when given)
STATUS = """
import asyncio, json, sys
from google.protobuf.json_format import MessageToDict
from services.common import tls
from loadgen.client import FrontendClient
if len(sys.argv) > 1:
    cert, key, ca, name = sys.argv[1:]
    tls.install(tls.TlsConfig(cert=cert, key=key, ca=ca, client_auth=True, server_name=name))
async def main():
    client = FrontendClient("127.0.0.1:50051")
    reply = await client.status(timeout_s=20)
    await client.close()
    print(json.dumps(MessageToDict(reply)))
asyncio.run(main())
"""


def podman(*args, check=True, timeout=120, **kw):
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def _image_ready():
    if shutil.which("podman") is None:
        return "podman is not installed"
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        return f"{IMAGE} not built (make image)"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_image_ready()), reason=_image_ready() or "ready")]


def _probe_command(obj):
    """The readiness probe of a workload's container, as a command to exec in it."""
    probe = obj["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    if "exec" in probe:
        return probe["exec"]["command"]
    return ["parm-grpc-probe", f"127.0.0.1:{probe['grpc']['port']}"]


def _wait_serving(container, command, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        proc = podman("exec", container, *command, check=False)
        if proc.returncode == 0:
            return
        last = proc.stderr.strip()
        time.sleep(1)
    logs = podman("logs", container, check=False)
    raise AssertionError(f"{container} not serving after {timeout_s} s: {last}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def _volume_from_files(name, files, owner=None, mode=None):
    """A podman volume holding ``files`` ({name: bytes})."""
    podman("volume", "create", name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arcname, data in sorted(files.items()):
            info = tarfile.TarInfo(arcname)
            info.size, info.mode = len(data), mode or 0o644
            tar.addfile(info, io.BytesIO(data))
    subprocess.run(["podman", "volume", "import", name, "-"], input=buf.getvalue(), check=True, env=ENV,
                   capture_output=True)
    if owner is not None:
        mountpoint = pathlib.Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
        for path in [mountpoint, *mountpoint.iterdir()]:
            os.chown(path, owner, owner)


def _base_accuracy(artifacts, manifest_name):
    import onnxruntime as ort

    from datasplits import load_split
    from services.common import manifest as manifest_mod

    m = manifest_mod.load(str(pathlib.Path(artifacts) / manifest_name))
    x, y = load_split(m.dataset, split="test", split_seed=m.split_seed)
    sess = ort.InferenceSession(str(pathlib.Path(artifacts) / manifest_name.replace(".json", ".onnx")),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32).reshape((len(x), *m.input_shape))})[0]
    return float((out.argmax(1) == y).mean())


def _artifact_server(name, volume):
    """A pod standing for an artifact store: the image's Python serving ``volume`` over HTTP."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Always",
                     "containers": [{"name": "http", "image": IMAGE,
                                     "command": ["python", "-m", "http.server", "8080", "--directory", "/srv"],
                                     "volumeMounts": [{"name": "srv", "mountPath": "/srv", "readOnly": True}]}],
                     "volumes": [{"name": "srv", "persistentVolumeClaim": {"claimName": volume}}]}}


@pytest.mark.parametrize("variant", ["plaintext", "mtls-coder-fetch"])
def test_coded_deployment_answers_queries_under_podman(render, tiny_artifacts, tmp_path, variant):
    """plaintext: models from the parm-models volume. mtls-coder-fetch: mutual
    TLS, the coder service, and models fetched over HTTP by each pod's init
    container (components tls, coder, models-fetch)."""
    tls = variant == "mtls-coder-fetch"
    tag = secrets.token_hex(3)
    prefix = f"parm-smoke-{tag}-"
    net, models_vol, results_vol, tls_vol = prefix + "net", prefix + "models", prefix + "results", prefix + "tls"
    subnet = f"10.{90 + int(tag[:2], 16) % 100}.{int(tag[2:4], 16)}"
    artifacts_ip = f"{subnet}.9"
    values = {"mode": "coded", "k": 2, "num_models": 2, "encoder": "concat", "deployment": "smoke",
              "model": "mnist-lenet5-wide", "tls": tls, "coder": tls,
              "models_url": f"http://{artifacts_ip}:8080/parm-artifacts.tar.gz" if tls else "",
              "loadgen": {"rate": 20, "num_queries": NUM_QUERIES, "warmup_queries": WARMUP, "seed": 3}}
    objects = render.render(values)
    servers = ["parm-data-0", "parm-data-1", "parm-parity-0"] + (["parm-coder-0", "parm-coder-1"] if tls else [])
    names = ["parm-registry-0", *servers, "parm-frontend-0", "parm-loadgen"]
    ips = {name: f"{subnet}.{10 + i}" for i, name in enumerate(names)}
    pods = render.podman_pods(objects, ips=ips, secrets={"parm-registry": {"password": secrets.token_hex(16)}},
                              models_volume=models_vol, results_volume=results_vol, scratch_prefix=prefix,
                              secret_volumes={"parm-tls": tls_vol})
    assert sorted(p[0] for p in pods) == sorted(names)
    by_name = {name: (ip, obj) for name, ip, obj in pods}
    workload = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("StatefulSet", "Deployment")}
    played = []
    try:
        podman("network", "create", "--internal", "--subnet", f"{subnet}.0/24", net)
        model_files = {p.name: p.read_bytes() for p in pathlib.Path(tiny_artifacts).iterdir()
                       if p.suffix in (".json", ".onnx")}
        if not tls:
            _volume_from_files(models_vol, model_files)
        else:  # the same files as a tarball behind HTTP, for the init containers
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for arcname, data in sorted(model_files.items()):
                    info = tarfile.TarInfo(arcname)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            _volume_from_files(prefix + "srv", {"parm-artifacts.tar.gz": buf.getvalue()})
            path = tmp_path / "parm-artifacts.yaml"
            path.write_text(yaml.safe_dump(_artifact_server(prefix + "artifacts", prefix + "srv")))
            podman("kube", "play", "--network", net, "--ip", artifacts_ip, str(path))
            played.append(path)
        _volume_from_files(results_vol, {}, owner=UID)  # fsGroup's job on a cluster
        if tls:
            from deploy.certs import make_certs

            certs = make_certs(tmp_path / "certs", hosts=("parm-internal",))
            _volume_from_files(tls_vol, {"ca.crt": pathlib.Path(certs.ca).read_bytes(),
                                         "tls.crt": pathlib.Path(certs.node_cert).read_bytes(),
                                         "tls.key": pathlib.Path(certs.node_key).read_bytes()},
                               owner=UID, mode=0o440)
        for name in names:
            ip, obj = by_name[name]
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
            podman("kube", "play", "--network", net, "--ip", ip, str(path), timeout=180)
            played.append(path)
            if name == "parm-frontend-0":
                # the manifests' own readiness probes (exec'd: podman runs no gRPC probes)
                for pod in servers:
                    owner = pod.rsplit("-", 1)[0]
                    container = f"{pod}-{workload[owner]['spec']['template']['spec']['containers'][0]['name']}"
                    _wait_serving(container, _probe_command(workload[owner]))
                _wait_serving("parm-frontend-0-frontend", _probe_command(workload["parm-frontend"]))
        rc = podman("wait", "parm-loadgen-loadgen", timeout=300).stdout.strip()
        logs = podman("logs", "parm-loadgen-loadgen", check=False)
        assert rc == "0", f"load generator exited {rc}:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}"

        # the records, from the results volume
        export = subprocess.run(["podman", "volume", "export", results_vol], check=True, capture_output=True, env=ENV)
        with tarfile.open(fileobj=io.BytesIO(export.stdout)) as tar:
            files = {m.name.lstrip("./"): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
        assert set(files) == {"parm-loadgen/records.csv", "parm-loadgen/summary.json"}, sorted(files)
        rows = list(csv.DictReader(io.StringIO(files["parm-loadgen/records.csv"])))
        assert len(rows) == NUM_QUERIES + WARMUP
        assert {r["status"] for r in rows} == {"OK"}
        assert {r["source"] for r in rows} <= {"original", "reconstructed"}
        originals = [r for r in rows if r["source"] == "original"]
        assert len(originals) >= NUM_QUERIES // 2
        served = np.mean([int(r["predicted"]) == int(r["label"]) for r in originals])
        expected = _base_accuracy(tiny_artifacts, "mnist-lenet5-wide.json")
        sources = {src: sum(r["source"] == src for r in rows) for src in ("original", "reconstructed")}
        print(f"smoke {variant}: {len(rows)} answered, sources {sources}, top-1 of originals {served:.3f} "
              f"(the model offline: {expected:.3f})")
        assert abs(served - expected) < 0.25, (served, expected)
        assert json.loads(files["parm-loadgen/summary.json"])

        # the frontend's view: every model server registered itself as its pod,
        # at the address the Downward API gave it, and served
        tls_argv = ["/etc/parm/tls/tls.crt", "/etc/parm/tls/tls.key", "/etc/parm/tls/ca.crt", "parm-internal"]
        for _ in range(3):  # a TLS handshake on a loaded machine may miss its deadline once
            proc = podman("exec", "parm-frontend-0-frontend", "python", "-c", STATUS, *(tls_argv if tls else []),
                          check=False)
            if proc.returncode == 0:
                break
            time.sleep(2)
        else:
            logs = podman("logs", "--tail", "60", "parm-frontend-0-frontend", check=False)
            raise AssertionError(f"GetStatus: {proc.stderr.strip()[-1500:]}\nfrontend:\n{logs.stdout}{logs.stderr}")
        status = json.loads(proc.stdout)
        instances = {i["instanceId"]: i for i in status["instances"]}
        assert set(instances) == {"parm-data-0", "parm-data-1", "parm-parity-0"}
        for pod, inst in instances.items():
            assert inst["address"] == f"{ips[pod]}:50061"
            assert inst["role"] == pod.split("-")[1]
            assert int(inst.get("completed", 0)) > 0, inst
        if tls:
            assert int(status["counters"].get("coder_fallbacks", 0)) == 0, status["counters"]
            for pod in ("parm-data-0", "parm-parity-0", "parm-frontend-0", "parm-loadgen"):
                fetched = podman("logs", f"{pod}-fetch-models").stdout
                assert fetched.startswith("parm-fetch-models: ") and "mnist-lenet5-wide.json" in fetched, fetched
        # the internal network has no way out
        out = podman("exec", "parm-frontend-0-frontend", "python", "-c",
                     "import socket; s = socket.socket(); s.settimeout(3); "
                     "print(s.connect_ex(('151.101.0.223', 80)))", check=False)
        assert out.stdout.strip() not in ("", "0"), out
    finally:
        for path in reversed(played):
            podman("kube", "down", str(path), check=False, timeout=120)
        volumes = [v for v in podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                   if v.startswith(prefix)]
        if volumes:
            podman("volume", "rm", "-f", *volumes, check=False)
        podman("network", "rm", "-f", net, check=False)
        leftovers = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        assert not [n for n in leftovers if n.startswith("parm-")], leftovers
        assert not [v for v in podman("volume", "ls", "--format", "{{.Name}}").stdout.split() if v.startswith(prefix)]
