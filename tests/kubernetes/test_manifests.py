"""The rendered manifests, for a matrix of values: valid against the
Kubernetes schemas (strict) of 1.27 and of the newest release that
kubernetes-validate ships, and right in what ParM needs of them."""

import itertools
import os
import pathlib
import re
import shutil

import pytest

# Under CI=true (.ci/run) a missing kubectl fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None and os.environ.get("CI") != "true",
                                reason="kubectl (with kustomize) is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
OLDEST = "1.27.0"  # native gRPC probes are GA from here
MODES = ("none", "equal", "coded", "cheap", "hedged")
MATRIX = [dict(variant=variant, k=k, mode=mode, num_models=4)
          for variant, k, mode in itertools.product(("cpu", "gpu"), (2, 4), MODES)]
# every option on, in both variants
MATRIX += [dict(variant=variant, k=2, mode="coded", num_models=6, tls=True, coder=True,
                models_url="https://models.example.com/parm.tar.gz",
                decode_policy="immediate" if variant == "cpu" else "late",
                loadgen={"rate": 50, "num_queries": 200}, namespace="parm", frontend_replicas=2,
                anti_affinity="required", failure_domain="topology.kubernetes.io/zone",
                resources={"data": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}})
           for variant in ("cpu", "gpu")]
SERVER_PORTS = {"model-server": 50061, "frontend": 50051, "coder": 50071}


def _id(values):
    return "-".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, dict))


@pytest.fixture(scope="module")
def rendered(render):
    cache = {}

    def get(values):
        key = repr(sorted(values.items()))
        if key not in cache:
            cache[key] = (render.resolve(values), render.render(values))
        return cache[key]

    return get


def objs(objects, kind, **labels):
    return [o for o in objects if o["kind"] == kind
            and all(o["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"]["labels"]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def workloads(objects):
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def flag(args, name):
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return found[0] if found else None


@pytest.fixture(scope="module")
def latest():
    import kubernetes_validate

    return kubernetes_validate.latest_version()


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_valid_against_kubernetes_schemas(rendered, values, latest):
    import kubernetes_validate

    _, objects = rendered(values)
    assert latest >= "1.30.0"
    for version in (OLDEST, latest):
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field(rendered):
    import kubernetes_validate

    _, objects = rendered(MATRIX[0])
    sts = dict(objs(objects, "StatefulSet", **{"parm-role": "data"})[0])
    sts["spec"] = dict(sts["spec"], replica=3)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, OLDEST, strict=True)


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_roles_replicas_and_headless_services(render, rendered, values):
    v, objects = rendered(values)
    counts = render.replicas(v)
    n, extra = v["num_models"], v["num_models"] // v["k"]
    expected = {"none": (n, 0, 0), "equal": (n + extra, 0, 0), "hedged": (n + extra, 0, 0),
                "coded": (n, extra, 0), "cheap": (n, 0, extra)}[v["mode"]]
    assert (counts["data"], counts["parity"], counts["backup"]) == expected
    for role, count in counts.items():
        sets = objs(objects, "StatefulSet", **{"parm-role": role})
        services = [s for s in objs(objects, "Service", **{"parm-role": role})]
        if not count:
            assert not sets and not services
            continue
        (sts,) = sets
        assert sts["spec"]["replicas"] == count
        headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
        assert len(headless) == 1, f"{role}: one headless Service"
        (svc,) = headless
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        assert selects(svc["spec"]["selector"], pod_labels(sts))
        assert [(p["name"], p["appProtocol"]) for p in svc["spec"]["ports"]] == [("grpc", "kubernetes.io/h2c")]
        args = pod_spec(sts)["containers"][0]["args"]
        assert flag(args, "role") == role
        assert flag(args, "advertise-address") == "$(POD_IP):50061"
        env = {e["name"]: e.get("valueFrom", {}) for e in pod_spec(sts)["containers"][0]["env"]}
        assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    (frontend,) = objs(objects, "Deployment", **{"app.kubernetes.io/component": "frontend"})
    assert frontend["spec"]["replicas"] == v["frontend_replicas"]
    fargs = pod_spec(frontend)["containers"][0]["args"]
    assert (flag(fargs, "parity-model") is not None) == (v["mode"] == "coded")
    assert (flag(fargs, "backup-model") is not None) == (v["mode"] == "cheap")
    assert (flag(fargs, "decode-policy") is not None) == bool(v["decode_policy"])
    fsvc = {s["metadata"]["name"]: s for s in objs(objects, "Service", **{"app.kubernetes.io/component": "frontend"})}
    assert fsvc["parm-frontend-headless"]["spec"]["clusterIP"] == "None"
    assert fsvc["parm-frontend"]["spec"].get("clusterIP") is None
    for svc in fsvc.values():
        grpc_port = next(p for p in svc["spec"]["ports"] if p["port"] == 50051)
        assert (grpc_port["name"], grpc_port["appProtocol"]) == ("grpc", "kubernetes.io/h2c")


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_probes_on_the_ports_the_servers_listen_on(rendered, values):
    v, objects = rendered(values)
    checked = 0
    for obj in workloads(objects):
        component = pod_labels(obj)["app.kubernetes.io/component"]
        if component not in SERVER_PORTS:
            continue
        (c,) = pod_spec(obj)["containers"]
        port = int(flag(c["args"], "port"))
        assert port == SERVER_PORTS[component]
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"] == [port]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if v["tls"]:
                command = c[probe]["exec"]["command"]
                assert command[:2] == ["sh", "-c"] and "grpc" not in c[probe]
                assert command[2].startswith("exec parm-grpc-probe ") and command[2].endswith(f" 127.0.0.1:{port}")
                assert "--tls-client-auth" in command[2]
            else:
                assert c[probe]["grpc"] == {"port": port}
        # the startup probe covers model loading: minutes, not the liveness probe's seconds
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert startup >= 60 and startup > c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
        checked += 1
    roles = [o for o in objs(objects, "StatefulSet") if "parm-role" in o["metadata"]["labels"]]
    assert checked == 1 + len(roles) + (1 if v["coder"] else 0)  # frontend, model servers, coder


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_disruption_budgets_and_anti_affinity(render, rendered, values):
    v, objects = rendered(values)
    pdbs = objs(objects, "PodDisruptionBudget")
    data = objs(objects, "StatefulSet", **{"parm-role": "data"})[0]
    for obj in workloads(objects):
        if obj["kind"] == "Job" or pod_labels(obj)["app.kubernetes.io/component"] == "registry":
            continue
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], pod_labels(obj))]
        assert len(covering) == 1, obj["metadata"]["name"]
        assert covering[0]["spec"] == {"maxUnavailable": 1, "selector": covering[0]["spec"]["selector"]}
    for role in ("parity", "backup"):
        for sts in objs(objects, "StatefulSet", **{"parm-role": role}):
            (term,) = pod_spec(sts)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert selects(term["labelSelector"]["matchLabels"], pod_labels(data))
            assert not selects(term["labelSelector"]["matchLabels"], pod_labels(sts))
            assert term["topologyKey"] == v["failure_domain"]
    assert [c["topologyKey"] for c in pod_spec(data)["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname", "topology.kubernetes.io/zone"]


def test_preferred_anti_affinity_on_request(render):
    objects = render.render({"mode": "cheap", "anti_affinity": "preferred"})
    (sts,) = objs(objects, "StatefulSet", **{"parm-role": "backup"})
    (term,) = pod_spec(sts)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["parm-role"] == "data"


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_gpu_only_in_the_gpu_variant(rendered, values):
    v, objects = rendered(values)
    gpu = v["variant"] == "gpu"
    config = objs(objects, "ConfigMap")[0]["data"]
    assert config["PROVIDER"] == ("cuda" if gpu else "cpu")
    for obj in workloads(objects):
        spec = pod_spec(obj)
        model_server = pod_labels(obj)["app.kubernetes.io/component"] == "model-server"
        for c in spec.get("initContainers", []) + spec["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            assert ("nvidia.com/gpu" in limits) == (gpu and model_server and c["name"] == "model-server")
            assert c["image"] == v["image"]
            assert c["image"].endswith("-gpu") == gpu
        assert ("nodeSelector" in spec) == (gpu and model_server)
        assert bool(spec.get("tolerations")) == (gpu and model_server)


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_no_secret_in_plain_values(rendered, values):
    v, objects = rendered(values)
    assert not objs(objects, "Secret")
    (config,) = objs(objects, "ConfigMap")
    for key, value in config["data"].items():
        assert not re.search(r"password|secret|token|key", key, re.I)
        assert "@" not in value, f"{key}: credentials in a URL"
    secret_refs = set()
    for obj in workloads(objects):
        spec = pod_spec(obj)
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
                    secret_refs.add(e["valueFrom"]["secretKeyRef"]["name"])
            assert not any(re.search(r"password|redis://[^/]*@", a, re.I) for a in c.get("args", []))
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                secret_refs.add(vol["secret"]["secretName"])
    assert secret_refs == ({"parm-registry", "parm-tls"} if v["tls"] else {"parm-registry"})


@pytest.mark.parametrize("values", MATRIX, ids=_id)
def test_every_argument_parses_with_the_service_it_is_for(render, rendered, values):
    """The args, once the kubelet expanded them, are accepted by each entry point's own parser."""
    from loadgen import cli as loadgen_cli
    from services.coder import app as coder_app
    from services.common import registry
    from services.frontend import config as frontend_config
    from services.model_server import config as ms_config

    v, objects = rendered(values)
    names = {}
    for obj in workloads(objects):
        if obj["kind"] == "StatefulSet":
            names.update({f"{obj['metadata']['name']}-{i}": None for i in range(obj["spec"]["replicas"])})
        elif obj["kind"] == "Deployment":
            names.update({f"{obj['metadata']['name']}-{i}": None for i in range(obj["spec"]["replicas"])})
        else:
            names[obj["metadata"]["name"]] = None
    ips = {name: f"10.0.0.{i + 10}" for i, name in enumerate(names)}
    pods = render.podman_pods(objects, ips=ips, secrets={"parm-registry": {"password": "pw"}},
                              models_volume="m", results_volume="r", secret_volumes={"parm-tls": "t"})
    parsers = {"services.model_server": ms_config.build_parser(), "services.frontend": frontend_config.build_parser(),
               "loadgen": loadgen_cli.run_parser()}
    seen = set()
    for name, ip, pod in pods:
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            args = c.get("args", [])
            assert not any("$(" in a for a in c["command"] + args), (name, c["command"], args)
            if c["command"][:2] != ["python", "-m"]:
                assert c["command"][0] == "parm-fetch-models" and c["command"][1] == v["models_url"]
                continue
            module = c["command"][2]
            seen.add(module)
            if module == "services.common.registry":
                assert registry.parse_config(args).port == 6379
                continue
            tls_args = [a for a in args if a.startswith("--tls-")]
            assert tls_args == (TLS_ARGS if v["tls"] else []), (name, tls_args)
            if module == "services.coder":  # no separate parser: parse_config checks the TLS files too
                assert coder_app.parse_config([a for a in args if a not in tls_args]).port == 50071
                continue
            parsed = parsers[module].parse_args(args)
            if module == "services.model_server":
                assert parsed.advertise_address == f"{ip}:50061" and parsed.instance_id == name
                assert parsed.host == "0.0.0.0"
            if module == "services.frontend":
                assert parsed.mode == v["mode"] and parsed.registry_url == "redis://parm-registry:6379/0"
                if v["decode_policy"]:
                    assert parsed.decode_policy == v["decode_policy"]
    assert {"services.model_server", "services.frontend", "services.common.registry"} <= seen


TLS_ARGS = ["--tls-cert=/etc/parm/tls/tls.crt", "--tls-key=/etc/parm/tls/tls.key", "--tls-ca=/etc/parm/tls/ca.crt",
            "--tls-client-auth", "--tls-server-name=parm-internal"]


def test_bad_values_are_one_line_errors(render):
    for values, message in (({"modee": "coded"}, "unknown value(s) modee"),
                            ({"mode": "coded", "k": 4, "num_models": 2}, "num_models (2) must be >= k (4)"),
                            ({"registry_password": "hunter2"}, "unknown value(s) registry_password"),
                            ({"mode": "fast"}, "mode 'fast' not in"),
                            ({"image": "parm"}, "needs a tag")):
        with pytest.raises(render.ValuesError, match=re.escape(message)):
            render.resolve(values)


OVERLAYS = sorted(p.parent for p in (ROOT / "kubernetes" / "overlays").glob("*/values.json"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_committed_overlays_are_what_render_writes_and_valid(render, overlay, latest):
    import json

    import kubernetes_validate
    import yaml

    values = json.loads((overlay / "values.json").read_text())
    committed = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert committed == render.kustomization(render.resolve(values), overlay), \
        f"regenerate: python kubernetes/render.py {overlay.relative_to(ROOT)}/values.json --overlay-dir {overlay.relative_to(ROOT)}"
    for obj in render.kustomize(overlay):
        for version in (OLDEST, latest):
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_base_alone_is_valid(render, latest):
    import kubernetes_validate

    objects = render.kustomize(ROOT / "kubernetes" / "base")
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget"}
    for obj in objects:
        for version in (OLDEST, latest):
            kubernetes_validate.validate(obj, version, strict=True)


def test_render_command_line(tmp_path):
    import subprocess
    import sys

    import yaml

    script = str(ROOT / "kubernetes" / "render.py")
    proc = subprocess.run([sys.executable, script, "--set", "mode=cheap", "--set", "num_models=4",
                           "--overlay-dir", str(tmp_path / "o"), "-o", str(tmp_path / "out.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (0, "")
    objects = list(yaml.safe_load_all((tmp_path / "out.yaml").read_text()))
    assert {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] == "StatefulSet"} == {
        ("StatefulSet", "parm-registry"), ("StatefulSet", "parm-data"), ("StatefulSet", "parm-backup")}
    assert (tmp_path / "o" / "kustomization.yaml").exists()
    for argv, message in ((["--set", "modee=x"], "render: unknown value(s) modee"),
                          (["--set", "mode"], "render: --set 'mode': expected KEY=VALUE"),
                          ([str(tmp_path / "none.json")], "render: ")):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_resources_per_role(rendered):
    values = MATRIX[-1]
    _, objects = rendered(values)
    for obj in workloads(objects):
        component = pod_labels(obj)["app.kubernetes.io/component"]
        (c,) = pod_spec(obj)["containers"]
        if pod_labels(obj).get("parm-role") == "data":
            assert c["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"},
                                      "limits": {"memory": "4Gi", "nvidia.com/gpu": 1}}
        else:
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], component
