"""A real run of the image under `podman kube play` (slow; needs podman and
`make image`): registry, two data and one parity model server, the frontend
(coded, k=2, concat) and the load generator Job, each its own pod from the
rendered manifests, on one internal pod network (no route out), the models
in a podman volume standing for the parm-models PVC, the records in another
for parm-results. Everything it creates is removed afterwards."""

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


def _wait_serving(container, port, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        proc = podman("exec", container, "parm-grpc-probe", f"127.0.0.1:{port}", check=False)
        if proc.returncode == 0:
            return
        last = proc.stderr.strip()
        time.sleep(1)
    logs = podman("logs", container, check=False)
    raise AssertionError(f"{container} not serving after {timeout_s} s: {last}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def _base_accuracy(artifacts, manifest_name):
    import onnxruntime as ort

    from models.data import load_split
    from services.common import manifest as manifest_mod

    m = manifest_mod.load(str(pathlib.Path(artifacts) / manifest_name))
    x, y = load_split(m.dataset, split="test", split_seed=m.split_seed)
    sess = ort.InferenceSession(str(pathlib.Path(artifacts) / manifest_name.replace(".json", ".onnx")),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32).reshape((len(x), *m.input_shape))})[0]
    return float((out.argmax(1) == y).mean())


def test_coded_deployment_answers_queries_under_podman(render, tiny_artifacts, tmp_path):
    tag = secrets.token_hex(3)
    net, models_vol, results_vol = f"parm-smoke-{tag}", f"parm-smoke-models-{tag}", f"parm-smoke-results-{tag}"
    subnet = f"10.{90 + int(tag[:2], 16) % 100}.{int(tag[2:4], 16)}"
    values = {"mode": "coded", "k": 2, "num_models": 2, "encoder": "concat", "deployment": "smoke",
              "model": "mnist-lenet5-wide",
              "loadgen": {"rate": 20, "num_queries": NUM_QUERIES, "warmup_queries": WARMUP, "seed": 3}}
    objects = render.render(values)
    names = ["parm-registry-0", "parm-data-0", "parm-data-1", "parm-parity-0", "parm-frontend-0", "parm-loadgen"]
    ips = {name: f"{subnet}.{10 + i}" for i, name in enumerate(names)}
    password = secrets.token_hex(16)
    pods = render.podman_pods(objects, ips=ips, secrets={"parm-registry": {"password": password}},
                              models_volume=models_vol, results_volume=results_vol,
                              scratch_prefix=f"parm-smoke-{tag}-")
    assert sorted(p[0] for p in pods) == sorted(names)
    by_name = {name: (ip, obj) for name, ip, obj in pods}
    played = []
    try:
        podman("network", "create", "--internal", "--subnet", f"{subnet}.0/24", net)
        podman("volume", "create", models_vol)
        podman("volume", "create", results_vol)
        # the models volume: the artifacts' manifests and ONNX files
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in sorted(pathlib.Path(tiny_artifacts).iterdir()):
                if p.suffix in (".json", ".onnx"):
                    tar.add(p, arcname=p.name)
        subprocess.run(["podman", "volume", "import", models_vol, "-"], input=buf.getvalue(), check=True,
                       env=ENV, capture_output=True)
        # the results volume is written by the image's user (fsGroup on a cluster)
        mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", results_vol).stdout.strip()
        os.chown(mountpoint, 10001, 10001)
        for name in names:
            ip, obj = by_name[name]
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
            podman("kube", "play", "--network", net, "--ip", ip, str(path), timeout=180)
            played.append(path)
            if name == "parm-registry-0":
                time.sleep(2)
            if name == "parm-frontend-0":
                for pod in names[1:4]:
                    _wait_serving(f"{pod}-model-server", 50061)
                _wait_serving("parm-frontend-0-frontend", 50051)
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
        print(f"smoke: {len(rows)} answered, sources {sources}, top-1 of originals {served:.3f} "
              f"(the model offline: {expected:.3f})")
        assert abs(served - expected) < 0.25, (served, expected)
        summary = json.loads(files["parm-loadgen/summary.json"])
        assert json.dumps(summary)  # parsed

        # every instance registered itself with the address the Downward API gave it
        frontend_logs = podman("logs", "parm-frontend-0-frontend", check=False)
        text = frontend_logs.stdout + frontend_logs.stderr
        for pod in ("parm-data-0", "parm-data-1", "parm-parity-0"):
            assert f"{ips[pod]}:50061" in text, f"{pod} ({ips[pod]}) not seen by the frontend:\n{text[-3000:]}"
        # the internal network has no way out
        out = podman("exec", "parm-frontend-0-frontend", "python", "-c",
                     "import socket; s = socket.socket(); s.settimeout(3); "
                     "print(s.connect_ex(('151.101.0.223', 80)))", check=False)
        assert out.stdout.strip() not in ("", "0"), out
    finally:
        for path in reversed(played):
            podman("kube", "down", str(path), check=False, timeout=120)
        scratch = [v for v in podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                   if v.startswith(f"parm-smoke-{tag}-")]
        podman("volume", "rm", "-f", models_vol, results_vol, *scratch, check=False)
        podman("network", "rm", "-f", net, check=False)
        leftovers = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        assert not [n for n in leftovers if n.startswith("parm-")], leftovers
