"""The user data *executed*, in a sandbox: shims stand in for the machine, moto for AWS.

``apt-get``, ``curl`` (instance metadata), ``systemctl`` and the venv's
``pip`` are shell shims that log what they are asked; ``systemctl
start|restart`` runs the unit's ``ExecStart`` (in the foreground for the
oneshot boot unit, in the background for services), so the boot script
really fetches the release from (moto) S3 with the embedded bootstrap,
really starts the node agent from its unit file, and the node really
reports ready to S3. Every background process is stopped at the end.
"""

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys

import psutil
import pytest

from deploy.aws import storage
from deploy.aws.session import Clients
from deploy.aws.settings import AwsSettings
from deploy.aws.userdata import render_user_data
from tests.aws.conftest import REGION, read_json_object

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "parm-sandbox"

SYSTEMCTL = r"""#!/bin/bash
echo "systemctl $*" >>"$SHIM_LOG"
verb="$1"; shift
[ "${1:-}" = "--no-block" ] && shift
unit="${1:-}"
case "$verb" in
  start|restart)
    cmd="$(sed -n 's/^ExecStart=//p' "$PARM_SYSTEMD_DIR/$unit")"
    if [ "$unit" = "parm-boot.service" ]; then
      $cmd
    else
      nohup $cmd >"$SHIM_DIR/$unit.log" 2>&1 &
      echo $! >>"$SHIM_DIR/pids"
    fi;;
esac
"""

CURL = r"""#!/bin/bash
echo "curl $*" >>"$SHIM_LOG"
for a in "$@"; do
  case "$a" in
    */api/token) echo TOKEN; exit 0;;
    */meta-data/instance-id) echo i-sandbox; exit 0;;
    */meta-data/local-ipv4) echo 127.0.0.1; exit 0;;
  esac
done
exit 22
"""

APT = """#!/bin/bash
echo "apt-get $*" >>"$SHIM_LOG"
if [ -n "${APT_FAIL:-}" ] && [ "${@: -1}" = "build-essential" ]; then
  echo "E: Unable to locate package build-essential"; exit 100
fi
"""

USERADD = """#!/bin/bash
echo "useradd $*" >>"$SHIM_LOG"
"""

RUNUSER = """#!/bin/bash
echo "runuser $*" >>"$SHIM_LOG"
while [ "$1" != "--" ]; do shift; done
shift
exec "$@"
"""

PYTHON3 = r"""#!/bin/bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  echo "python3 $*" >>"$SHIM_LOG"
  mkdir -p "$3/bin"
  cat >"$3/bin/python" <<PYSHIM
#!/bin/bash
if [ "\$1" = "-m" ] && [ "\$2" = "pip" ]; then echo "pip \${*:3}" >>"$SHIM_LOG"; exit 0; fi
exec REAL_PY "\$@"
PYSHIM
  chmod +x "$3/bin/python"
  exit 0
fi
exec REAL_PY "$@"
"""


def _shim(directory, name, text):
    path = directory / name
    path.write_text(text.replace("REAL_PY", sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pids(pids_file):
    for pid in (int(p) for p in pids_file.read_text().split()) if pids_file.exists() else ():
        try:
            os.kill(pid, signal.SIGTERM)
            psutil.Process(pid).wait(timeout=15)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)


def _sandbox(aws, tmp_path, role, gpu, **extra_env):
    """Release, artifacts and the deployment's TLS files in (moto) S3; shims; the user data -> (env, paths)."""
    from deploy.certs import make_certs
    from deploy.remote.agent import TLS_SERVER_NAME

    clients = Clients(AwsSettings(region=REGION, endpoint_url=aws["url"]))
    storage.ensure_bucket(clients, BUCKET)
    wheel = tmp_path / "parm-0.1.0-cp310-cp310-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    storage.upload_release(clients, BUCKET, "sbx", wheel, None)
    storage.put_json(clients, BUCKET, "sbx/artifacts/m/model.json", {"name": "m"})
    certs = make_certs(tmp_path / "certs", hosts=(TLS_SERVER_NAME,))
    for name, path in (("ca.pem", certs.ca), ("node.pem", certs.node_cert), ("node.key", certs.node_key)):
        storage.upload_file(clients, BUCKET, f"sbx/tls/{name}", path, skip_unchanged=False)

    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("curl", CURL), ("apt-get", APT), ("python3", PYTHON3),
                       ("useradd", USERADD), ("runuser", RUNUSER)):
        _shim(shims, name, text)
    paths = {"home": tmp_path / "opt-parm", "units": tmp_path / "systemd", "logs": tmp_path / "log",
             "wheel": wheel, "script": tmp_path / "user-data.sh", "pids": tmp_path / "pids",
             "shim_log": tmp_path / "shim.log", "port": _free_port(), "clients": clients}
    paths["units"].mkdir()
    paths["script"].write_text(render_user_data(role, experiment_id="sbx", bucket=BUCKET, region=REGION,
                                                agent_port=paths["port"], gpu=gpu, bucket_owner=aws["account"]))
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", PARM_HOME=str(paths["home"]),
               PARM_SYSTEMD_DIR=str(paths["units"]), PARM_LOG_DIR=str(paths["logs"]),
               PARM_USER=pwd.getpwuid(os.getuid()).pw_name, SHIM_LOG=str(paths["shim_log"]),
               SHIM_DIR=str(tmp_path), AWS_ENDPOINT_URL=aws["url"], PYTHONPATH=REPO, **extra_env)
    return env, paths


def _boot(env, paths, tmp_path):
    proc = subprocess.run(["bash", str(paths["script"])], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    log = paths["logs"] / "boot.log"
    return proc, log.read_text() if log.exists() else "", paths["shim_log"].read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("role,gpu", [("worker", True), ("frontend", False)])
def test_user_data_boots_the_node(role, gpu, aws, tmp_path):
    env, paths = _sandbox(aws, tmp_path, role, gpu)
    home, units, logs, wheel, port = paths["home"], paths["units"], paths["logs"], paths["wheel"], paths["port"]
    clients = paths["clients"]
    try:
        proc, boot_log, shim_log = _boot(env, paths, tmp_path)
        extra = "gpu" if gpu else "report,deploy"
        assert f"pip install -q --retries 10 --timeout 60 --force-reinstall {home}/dist/{wheel.name}[{extra}]" \
            in shim_log, shim_log
        assert any(line.startswith("apt-get -q -y -o DPkg::Lock::Timeout=1200 install python3-venv")
                   for line in shim_log)
        # Only the boot unit is enabled; the old agent/runner are stopped first.
        assert "systemctl enable parm-boot.service" in shim_log
        assert not any(line.startswith("systemctl enable parm-agent") for line in shim_log)
        assert shim_log.index("systemctl stop parm-runner.service parm-agent.service") < \
            shim_log.index("systemctl restart parm-agent.service")
        assert ("systemctl restart parm-runner.service" in shim_log) == (role == "frontend")
        agent_unit = (units / "parm-agent.service").read_text()
        assert f"-m deploy.remote.agent --host 127.0.0.1 --port {port} --log-dir {logs}/agent" in agent_unit
        assert f"--tls-ca {home}/tls/ca.pem --tls-client-auth" in agent_unit
        assert f"User={env['PARM_USER']}" in agent_unit
        assert ("--model-server-provider cuda" in agent_unit) == gpu
        assert json.loads((home / "artifacts" / "m" / "model.json").read_text()) == {"name": "m"}
        assert json.loads((home / "release.json").read_text())["wheel"] == f"{home}/dist/{wheel.name}"
        assert (home / "tls" / "node.key").stat().st_mode & 0o777 == 0o600
        ready = read_json_object(clients.s3, BUCKET, "sbx/ready/i-sandbox.json")
        assert (ready["role"], ready["agent"]) == (role, f"127.0.0.1:{port}")
        if gpu:
            # No CUDA here: the GPU worker must not pass as ready (it would measure CPU inference).
            assert proc.returncode == 1
            assert ready["state"] == "failed" and ready["reason"].startswith("the CUDA provider is not available")
            assert "parm boot: the node is not ready" in boot_log
        else:
            assert proc.returncode == 0, proc.stderr + boot_log
            # The ready check reached the agent over mutual TLS with the deployment's CA.
            assert ready["state"] == "ready", ready
            assert "parm boot: ready" in boot_log
        pids = [int(p) for p in paths["pids"].read_text().split()]
        assert len(pids) == (2 if role == "frontend" else 1)
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        _stop_pids(paths["pids"])


@pytest.mark.slow
def test_a_failed_boot_reports_its_step_and_log_tail(aws, tmp_path):
    """Item 6: apt-get fails (after its retries): the failure and the log's tail reach S3."""
    env, paths = _sandbox(aws, tmp_path, "client", False, APT_FAIL="1")
    script = paths["script"].read_text().replace("sleep $((n * 15))", "sleep 0")
    paths["script"].write_text(script)
    try:
        proc, boot_log, shim_log = _boot(env, paths, tmp_path)
        assert proc.returncode == 100, boot_log
        assert sum(line.endswith("install python3-venv python3-dev build-essential") for line in shim_log) == 5
        report = read_json_object(paths["clients"].s3, BUCKET, "sbx/ready/i-sandbox.json")
        assert (report["state"], report["role"], report["instance_id"]) == ("failed", "client", "i-sandbox")
        assert report["reason"] == "boot failed at step 'apt-get' (exit 100)"
        assert "E: Unable to locate package build-essential" in report["log_tail"]
        assert not paths["pids"].exists()  # nothing was started
    finally:
        _stop_pids(paths["pids"])
