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


@pytest.mark.slow
@pytest.mark.parametrize("role,gpu", [("worker", True), ("frontend", False)])
def test_user_data_boots_the_node(role, gpu, aws, tmp_path):
    clients = Clients(AwsSettings(region=REGION, endpoint_url=aws["url"]))
    storage.ensure_bucket(clients, BUCKET)
    wheel = tmp_path / "parm-0.1.0-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    storage.upload_release(clients, BUCKET, "sbx", wheel, None)
    storage.put_json(clients, BUCKET, "sbx/artifacts/m/model.json", {"name": "m"})

    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("curl", CURL), ("apt-get", APT), ("python3", PYTHON3)):
        _shim(shims, name, text)
    home, units, logs = tmp_path / "opt-parm", tmp_path / "systemd", tmp_path / "log"
    units.mkdir()
    port = _free_port()
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(role, experiment_id="sbx", bucket=BUCKET, region=REGION,
                                       agent_port=port, gpu=gpu))
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", PARM_HOME=str(home),
               PARM_SYSTEMD_DIR=str(units), PARM_LOG_DIR=str(logs), SHIM_LOG=str(tmp_path / "shim.log"),
               SHIM_DIR=str(tmp_path), AWS_ENDPOINT_URL=aws["url"], PYTHONPATH=REPO)
    pids_file = tmp_path / "pids"
    try:
        proc = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=240)
        boot_log = (logs / "boot.log").read_text() if (logs / "boot.log").exists() else ""
        assert proc.returncode == 0, proc.stderr + boot_log
        shim_log = (tmp_path / "shim.log").read_text().splitlines()
        extra = "gpu" if gpu else "cpu"
        assert f"pip install -q --force-reinstall {home}/dist/{wheel.name}[{extra}]" in shim_log
        assert any(line.startswith("apt-get install -y -q python3-venv") for line in shim_log)
        expected = ["parm-boot.service", "parm-agent.service"] + (["parm-runner.service"] if role == "frontend" else [])
        for unit in expected:
            assert f"systemctl enable {unit}" in shim_log
        assert ("systemctl restart parm-runner.service" in shim_log) == (role == "frontend")
        agent_unit = (units / "parm-agent.service").read_text()
        assert f"-m deploy.remote.agent --host 127.0.0.1 --port {port} --log-dir {logs}/agent" in agent_unit
        assert json.loads((home / "artifacts" / "m" / "model.json").read_text()) == {"name": "m"}
        assert json.loads((home / "release.json").read_text())["wheel"] == f"{home}/dist/{wheel.name}"
        ready = read_json_object(clients.s3, BUCKET, "sbx/ready/i-sandbox.json")
        assert (ready["state"], ready["role"], ready["agent"]) == ("ready", role, f"127.0.0.1:{port}")
        assert "parm boot: ready" in boot_log
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == len(expected) - 1
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        _stop_pids(pids_file)
