"""Complete a wheelhouse for another interpreter's environment markers.

    python kubernetes/wheelhouse.py WHEELS_DIR ENVIRONMENT_JSON EXTRAS

`pip wheel` evaluates environment markers for the Python that runs it; the
image's Python may differ in patch version (redis requires async-timeout on
Python < 3.11.3, and Debian 12 has 3.11.2). ENVIRONMENT_JSON is the marker
environment of the target (printed by `ENV_SCRIPT` run there). Every
requirement of a wheel in WHEELS_DIR (parm with EXTRAS, e.g. `cpu,data`)
whose marker holds there and that no wheel satisfies is downloaded with
`pip download --no-deps` until nothing is missing. Prints what it added.
"""

import json
import pathlib
import subprocess
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ENV_SCRIPT = (
    "import json, os, platform, sys; print(json.dumps({"
    "'implementation_name': sys.implementation.name, "
    "'implementation_version': platform.python_version(), "
    "'os_name': os.name, 'platform_machine': platform.machine(), "
    "'platform_release': platform.release(), 'platform_system': platform.system(), "
    "'platform_version': platform.version(), 'python_full_version': platform.python_version(), "
    "'platform_python_implementation': platform.python_implementation(), "
    "'python_version': '.'.join(platform.python_version_tuple()[:2]), 'sys_platform': sys.platform}))"
)


def requirements(wheel):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def missing(wheels_dir, environment, roots):
    have = {}
    for w in pathlib.Path(wheels_dir).glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(w.name)
        have[name] = (version, w)
    todo = [(canonicalize_name(n), set(extras)) for n, extras in roots]
    seen, out = set(), []
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen or name not in have:
            continue
        seen.add((name, frozenset(extras)))
        for req in requirements(have[name][1]):
            env = dict(environment)
            if req.marker is not None and not any(
                    req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""})):
                continue
            dep = canonicalize_name(req.name)
            if dep in have and req.specifier.contains(have[dep][0], prereleases=True):
                todo.append((dep, set(req.extras)))
            else:  # absent, or a version that does not satisfy: pip download finds one (or says why not)
                out.append(req)
    return out


def main(argv=None):
    wheels_dir, env_json, extras = (sys.argv[1:] if argv is None else argv)
    environment = dict(default_environment(), **json.loads(env_json))
    added = []
    for _ in range(20):
        reqs = missing(wheels_dir, environment, [("parm", set(extras.split(",")))])
        if not reqs:
            break
        specs = sorted({f"{r.name}{r.specifier}" for r in reqs})
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", wheels_dir, *specs], check=True)
        added += specs
    else:
        print("wheelhouse: requirements still missing after 20 rounds", file=sys.stderr)
        return 1
    print(f"wheelhouse: added for the target's markers: {', '.join(added) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
