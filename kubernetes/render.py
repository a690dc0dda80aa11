"""Render ParM's Kubernetes manifests for one set of values.

    python kubernetes/render.py [VALUES.json] [--set KEY=VALUE ...] [--overlay-dir DIR] [-o OUT.yaml]

Writes a Kustomize overlay (kustomization.yaml over kubernetes/base and the
components the values ask for), runs `kubectl kustomize` on it and prints
the manifests (or writes them to OUT.yaml). The overlay is an ordinary one:
keep it (--overlay-dir) and edit it as any Kustomize user would. Values and
defaults are in DEFAULTS; an unknown key or a bad value is one line on
stderr and exit 2. Secrets are never values: the manifests reference the
Secrets parm-registry (and parm-tls with tls) by name.

`podman_pods(objects, ...)` turns rendered objects into Pods for
`podman kube play` (which takes Pods and Deployments only): the smoke test.
"""

import argparse
import copy
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
MODES = ("none", "equal", "coded", "cheap", "hedged")
DEFAULTS = {
    "namespace": "",
    "image": "",  # default: localhost/parm:0.1.0, or localhost/parm:0.1.0-gpu for the gpu variant
    "variant": "cpu",  # cpu | gpu
    "mode": "coded",
    "k": 2,
    "num_models": 2,
    "encoder": "concat",
    "queue_mode": "single_queue",
    "batch_size": 1,
    "batch_timeout_ms": 5,
    "decode_policy": "",  # "" (the frontend's default, late) | late | immediate
    "deployment": "default",
    "log_level": "INFO",
    "model": "mnist-lenet5-wide",  # base artifact name; parity/backup names follow models.build
    "models_url": "",  # "" = the parm-models volume; else an init container fetches this tarball
    "frontend_replicas": 1,
    "coder": False,
    "coder_replicas": 2,
    "tls": False,
    "tls_server_name": "parm-internal",
    "failure_domain": "kubernetes.io/hostname",
    "anti_affinity": "required",  # required | preferred
    "gpu": {"count": 1, "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "resources": {},  # role (data|parity|backup|frontend|coder|registry|loadgen) -> {requests, limits}
    "loadgen": None,  # None = no Job; else {rate, num_queries, warmup_queries, deadline_s, seed}
}
LOADGEN_DEFAULTS = {"rate": 20, "num_queries": 1000, "warmup_queries": 50, "deadline_s": 10, "seed": 0}
ROLE_OBJECTS = {"data": ("StatefulSet", "parm-data"), "parity": ("StatefulSet", "parm-parity"),
                "backup": ("StatefulSet", "parm-backup"), "frontend": ("Deployment", "parm-frontend"),
                "coder": ("Deployment", "parm-coder"), "registry": ("StatefulSet", "parm-registry"),
                "loadgen": ("Job", "parm-loadgen")}


class ValuesError(ValueError):
    """Bad values (one line)."""


def _merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "resources":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve(values):
    """Values with defaults filled in and checked; raises ValuesError."""
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ValuesError(f"unknown value(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    v = _merge(DEFAULTS, values)
    if v["mode"] not in MODES:
        raise ValuesError(f"mode {v['mode']!r} not in {MODES}")
    if v["variant"] not in ("cpu", "gpu"):
        raise ValuesError(f"variant {v['variant']!r} not in ('cpu', 'gpu')")
    for key in ("k", "num_models", "batch_size", "frontend_replicas", "coder_replicas"):
        if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] < 1:
            raise ValuesError(f"{key} must be an integer >= 1, got {v[key]!r}")
    if v["k"] < 2:
        raise ValuesError(f"k must be >= 2, got {v['k']}")
    if v["mode"] != "none" and v["num_models"] < v["k"]:
        raise ValuesError(f"num_models ({v['num_models']}) must be >= k ({v['k']}): N/k instances of the second role")
    if v["encoder"] not in ("sum", "concat"):
        raise ValuesError(f"encoder {v['encoder']!r} not in ('sum', 'concat')")
    if v["encoder"] == "concat" and v["mode"] == "coded" and v["k"] not in (2, 4):
        raise ValuesError(f"the concat encoder needs k in (2, 4), got {v['k']}")
    if v["decode_policy"] not in ("", "late", "immediate"):
        raise ValuesError(f"decode_policy {v['decode_policy']!r} not in ('', 'late', 'immediate')")
    if v["anti_affinity"] not in ("required", "preferred"):
        raise ValuesError(f"anti_affinity {v['anti_affinity']!r} not in ('required', 'preferred')")
    v["image"] = v["image"] or ("localhost/parm:0.1.0-gpu" if v["variant"] == "gpu" else "localhost/parm:0.1.0")
    if ":" not in v["image"].rsplit("/", 1)[-1]:
        raise ValuesError(f"image {v['image']!r} needs a tag (name:tag)")
    for role in v["resources"]:
        if role not in ROLE_OBJECTS:
            raise ValuesError(f"resources: unknown role {role!r} (known: {', '.join(ROLE_OBJECTS)})")
    if v["loadgen"] is not None:
        extra = sorted(set(v["loadgen"]) - set(LOADGEN_DEFAULTS))
        if extra:
            raise ValuesError(f"loadgen: unknown value(s) {', '.join(extra)}")
        v["loadgen"] = dict(LOADGEN_DEFAULTS, **v["loadgen"])
    for key, value in _walk(values):
        if re.search(r"(password|secret|token|private)", key, re.I):
            raise ValuesError(f"{key}: secrets are not values; create the Secret (docs/kubernetes.md)")
    return v


def _walk(obj, prefix=""):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]


def replicas(v):
    """Replicas per model-server role: DESIGN section 4."""
    n, extra = v["num_models"], max(1, v["num_models"] // v["k"])
    return {
        "data": n + (extra if v["mode"] in ("equal", "hedged") else 0),
        "parity": extra if v["mode"] == "coded" else 0,
        "backup": extra if v["mode"] == "cheap" else 0,
    }


def kustomization(v, overlay_dir):
    """The overlay's kustomization.yaml (a dict) for resolved values ``v``."""
    rel = lambda p: os.path.relpath(HERE / p, overlay_dir)  # noqa: E731
    # Components that add objects first, then those that patch them (a patch
    # applies to what exists when its component is applied).
    components = []
    if v["mode"] in ("coded", "cheap"):
        components.append(f"mode-{v['mode']}")
    for flag, name in (("coder", "coder"), ("loadgen", "loadgen"), ("tls", "tls")):
        if v[flag]:
            components.append(name)
    if v["variant"] == "gpu":
        components.append("gpu")
    if v["models_url"]:
        components.append("models-fetch")
    if v["decode_policy"]:
        components.append("decode-policy")
    name, tag = v["image"].rsplit(":", 1)
    literals = {
        "MODE": v["mode"], "K": v["k"], "ENCODER": v["encoder"], "QUEUE_MODE": v["queue_mode"],
        "BATCH_SIZE": v["batch_size"], "BATCH_TIMEOUT_MS": v["batch_timeout_ms"],
        "BASE_MODEL": f"{v['model']}.json",
        "PARITY_MODEL": f"{v['model']}-parity-k{v['k']}-{v['encoder']}.json",
        "BACKUP_MODEL": f"{v['model']}-backup.json",
        "DEPLOYMENT": v["deployment"], "LOG_LEVEL": v["log_level"],
        "PROVIDER": "cuda" if v["variant"] == "gpu" else "cpu",
    }
    if v["decode_policy"]:
        literals["DECODE_POLICY"] = v["decode_policy"]
    if v["models_url"]:
        literals["MODELS_URL"] = v["models_url"]
    if v["tls"]:
        literals["TLS_SERVER_NAME"] = v["tls_server_name"]
    if v["loadgen"]:
        for key, value in v["loadgen"].items():
            literals[f"LOADGEN_{key.upper()}"] = value
    counts = replicas(v)
    reps = [{"name": "parm-data", "count": counts["data"]}, {"name": "parm-frontend", "count": v["frontend_replicas"]}]
    for role in ("parity", "backup"):
        if counts[role]:
            reps.append({"name": f"parm-{role}", "count": counts[role]})
    if v["coder"]:
        reps.append({"name": "parm-coder", "count": v["coder_replicas"]})
    out = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel("base")],
        "components": [rel(f"components/{c}") for c in components],
        # `parm` in components' objects, `localhost/parm` once the base's own image transformer ran
        "images": [{"name": n, "newName": name, "newTag": tag} for n in ("parm", "localhost/parm")],
        "replicas": reps,
        "configMapGenerator": [{"name": "parm-config", "behavior": "merge",
                                "literals": [f"{k}={val}" for k, val in literals.items()]}],
        "patches": _patches(v, counts),
    }
    if v["namespace"]:
        out["namespace"] = v["namespace"]
    return out


def _patches(v, counts):
    # resources first: the GPU limit is added on top of them
    patches = [_json_patch(ROLE_OBJECTS[role][0], ROLE_OBJECTS[role][1],
                           [{"op": "replace", "path": "/spec/template/spec/containers/0/resources", "value": res}])
               for role, res in v["resources"].items()]
    for role in ("parity", "backup"):
        if not counts[role] or (v["anti_affinity"], v["failure_domain"]) == ("required", DEFAULTS["failure_domain"]):
            continue  # the components' own rule
        term = {"labelSelector": {"matchLabels": {"app.kubernetes.io/component": "model-server", "parm-role": "data"}},
                "topologyKey": v["failure_domain"]}
        rule = ({"requiredDuringSchedulingIgnoredDuringExecution": [term]} if v["anti_affinity"] == "required"
                else {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]})
        patches.append(_json_patch("StatefulSet", f"parm-{role}",
                                   [{"op": "replace", "path": "/spec/template/spec/affinity",
                                     "value": {"podAntiAffinity": rule}}]))
    if v["variant"] == "gpu":
        ops = [{"op": "add", "path": "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu",
                "value": v["gpu"]["count"]},
               {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": v["gpu"]["node_selector"]},
               {"op": "add", "path": "/spec/template/spec/tolerations", "value": v["gpu"]["tolerations"]}]
        for role in ("data", "parity", "backup"):
            if counts[role]:
                patches.append(_json_patch("StatefulSet", f"parm-{role}", ops))
    return patches


def _json_patch(kind, name, ops):
    return {"target": {"kind": kind, "name": name}, "patch": yaml.safe_dump(ops, sort_keys=False)}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the patches) as literal blocks, readable and editable."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def write_overlay(values, overlay_dir):
    """Resolves ``values`` and writes the overlay; returns the resolved values."""
    v = resolve(values)
    overlay_dir = pathlib.Path(overlay_dir)
    overlay_dir.mkdir(parents=True, exist_ok=True)
    text = ("# Written by kubernetes/render.py from these values:\n"
            + "".join(f"#   {line}\n" for line in json.dumps(values, sort_keys=True).splitlines())
            + yaml.dump(kustomization(v, overlay_dir.resolve()), Dumper=_Dumper, sort_keys=False))
    (overlay_dir / "kustomization.yaml").write_text(text)
    return v


def kustomize(overlay_dir, kubectl="kubectl"):
    """``kubectl kustomize`` of a directory -> list of objects."""
    exe = shutil.which(kubectl)
    if exe is None:
        raise ValuesError(f"{kubectl} not found (kubectl with kustomize is needed to render)")
    proc = subprocess.run([exe, "kustomize", str(overlay_dir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValuesError(f"kubectl kustomize {overlay_dir}: {proc.stderr.strip()}")
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


def render(values, overlay_dir=None):
    """Objects (a list of dicts) for ``values``."""
    if overlay_dir is not None:
        write_overlay(values, overlay_dir)
        return kustomize(overlay_dir)
    with tempfile.TemporaryDirectory(prefix="parm-render-") as tmp:
        write_overlay(values, tmp)
        return kustomize(tmp)


# --- podman kube play ----------------------------------------------------------

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def podman_pods(objects, *, ips, secrets, models_volume, results_volume=None, scratch_prefix="parm-scratch-",
                secret_volumes=None):
    """Objects for ``podman kube play``, one (name, ip, object) per pod.

    What podman 4.3 does not do, done here as a kubelet would:
    StatefulSets become their pods (``parm-data-0``, ...; hostname and
    subdomain as the StatefulSet controller sets them), the Job becomes a Pod;
    env from the ConfigMap, the Secrets (``secrets``: name -> {key: value}) and
    the Downward API (metadata.name, status.podIP: the pod's address in
    ``ips``, a dict pod name -> IP) is resolved and ``$(VAR)`` expanded in
    command and args; Services become /etc/hosts entries (hostAliases) of
    every pod. Probes are dropped (podman has no gRPC probes), so are ports
    (podman 4.3 would publish each on the host), and the
    volumes ``parm-models``/``parm-results`` become podman volumes. podman
    4.3 makes an emptyDir a named volume of the volume's name, shared by every
    pod that uses the name: each becomes ``{scratch_prefix}{pod}-{volume}``
    (the caller removes them). Init containers are of podman's `always`
    type (run at each start of the pod). A Secret volume becomes the podman volume
    ``secret_volumes[secretName]`` (holding the Secret's files).
    """
    secret_volumes = secret_volumes or {}
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("parm-config"))
    pods = []
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        if kind == "StatefulSet":
            for i in range(obj["spec"].get("replicas", 1)):
                spec = copy.deepcopy(obj["spec"]["template"]["spec"])
                spec["hostname"], spec["subdomain"] = f"{meta['name']}-{i}", obj["spec"]["serviceName"]
                pods.append((f"{meta['name']}-{i}", copy.deepcopy(obj["spec"]["template"]["metadata"]), spec, "Always"))
        elif kind == "Deployment":
            for i in range(obj["spec"].get("replicas", 1)):
                pods.append((f"{meta['name']}-{i}", copy.deepcopy(obj["spec"]["template"]["metadata"]),
                             copy.deepcopy(obj["spec"]["template"]["spec"]), "Always"))
        elif kind == "Job":
            pods.append((meta["name"], copy.deepcopy(obj["spec"]["template"]["metadata"]),
                         copy.deepcopy(obj["spec"]["template"]["spec"]), "Never"))
    missing = [name for name, *_ in pods if name not in ips]
    if missing:
        raise ValuesError(f"no IP for pod(s) {', '.join(missing)}")
    aliases = {}
    for obj in objects:
        if obj["kind"] != "Service":
            continue
        selector = obj["spec"].get("selector", {})
        for name, meta, _, _ in pods:
            if all(meta.get("labels", {}).get(k) == val for k, val in selector.items()):
                aliases.setdefault(ips[name], []).append(obj["metadata"]["name"])
    for name, _, spec, _ in pods:
        if spec.get("subdomain"):
            aliases.setdefault(ips[name], []).append(f"{name}.{spec['subdomain']}")
    host_aliases = [{"ip": ip, "hostnames": sorted(set(names))} for ip, names in sorted(aliases.items())]
    out = []
    for name, meta, spec, restart in pods:
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {}
            for src in c.pop("envFrom", []):
                if "configMapRef" in src:
                    env.update({src.get("prefix", "") + k: str(val) for k, val in config["data"].items()})
            for e in c.pop("env", []):
                ref = e.get("valueFrom", {})
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "secretKeyRef" in ref:
                    env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
                elif "configMapKeyRef" in ref:
                    env[e["name"]] = str(config["data"][ref["configMapKeyRef"]["key"]])
                elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
                    env[e["name"]] = name
                elif ref.get("fieldRef", {}).get("fieldPath") == "status.podIP":
                    env[e["name"]] = ips[name]
                else:
                    raise ValuesError(f"{name}: env {e['name']}: no podman equivalent for {ref}")
            for key in ("command", "args"):
                if key in c:
                    c[key] = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in c[key]]
            c["env"] = [{"name": k, "value": val} for k, val in sorted(env.items())]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                c.pop(probe, None)
            c.pop("resources", None)  # 2 shared cores: podman would enforce the requests' CPU quota
            c.pop("ports", None)  # podman 4.3 publishes every containerPort on the host
        renamed = {}
        for vol in spec.get("volumes", []):
            if "emptyDir" in vol:
                renamed[vol["name"]] = vol["name"] = f"{scratch_prefix}{name}-{vol['name']}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            for mount in c.get("volumeMounts", []):
                mount["name"] = renamed.get(mount["name"], mount["name"])
        for vol in spec.get("volumes", []):
            claim = vol.get("persistentVolumeClaim", {}).get("claimName")
            if claim == "parm-models":
                vol["persistentVolumeClaim"] = {"claimName": models_volume}
            elif claim == "parm-results":
                vol["persistentVolumeClaim"] = {"claimName": results_volume}
            if "secret" in vol:
                secret_name = vol.pop("secret")["secretName"]
                if secret_name not in secret_volumes:
                    raise ValuesError(f"{name}: no podman volume for Secret {secret_name}")
                vol["persistentVolumeClaim"] = {"claimName": secret_volumes[secret_name], "readOnly": True}
        for key in ("topologySpreadConstraints", "affinity", "subdomain", "automountServiceAccountToken",
                    "enableServiceLinks", "terminationGracePeriodSeconds"):
            spec.pop(key, None)
        spec["hostAliases"] = host_aliases
        spec["restartPolicy"] = restart
        meta = {"name": name, "labels": meta.get("labels", {})}
        if spec.get("initContainers"):
            # podman 4.3 removes a `once` init container after it ran and can
            # race with its exit ("cannot remove container ... as it is running")
            meta["annotations"] = {"io.podman.annotations.init.container.type": "always"}
        out.append((name, ips[name], {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python kubernetes/render.py", description=__doc__.splitlines()[0])
    parser.add_argument("values", nargs="?", help="JSON (or YAML) file of values (default: all defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one value (VALUE parsed as JSON when it is JSON, else a string)")
    parser.add_argument("--overlay-dir", default=None, help="write the overlay here and keep it")
    parser.add_argument("-o", "--output", default=None, help="write the manifests here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        values = {}
        if args.values:
            try:
                values = yaml.safe_load(pathlib.Path(args.values).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ValuesError(f"{args.values}: {exc}") from None
        for item in args.set:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValuesError(f"--set {item!r}: expected KEY=VALUE")
            try:
                values[key] = json.loads(text)
            except ValueError:
                values[key] = text
        objects = render(values, args.overlay_dir)
    except ValuesError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    text = yaml.safe_dump_all(objects, sort_keys=False)
    if args.output:
        pathlib.Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
