"""User data per role: valid bash, the right services, the embedded bootstrap."""

import inspect
import re
import subprocess

import pytest

from deploy.aws import bootstrap
from deploy.aws.userdata import MAX_USER_DATA_BYTES, render_boot, render_user_data

ARGS = dict(experiment_id="fig9a", bucket="parm-123-us-east-1", region="us-east-1", agent_port=7070)


def heredoc(script, marker):
    match = re.search(rf"<<'{marker}'\n(.*?)\n{marker}\n", script, re.S)
    assert match, marker
    return match.group(1)


def bash_n(text, tmp_path, name):
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("role,gpu", [("frontend", False), ("worker", True), ("worker", False), ("client", False)])
def test_user_data_is_valid_bash_and_installs_the_boot_unit(role, gpu, tmp_path):
    script = render_user_data(role, gpu=gpu, **ARGS)
    assert script.startswith("#!/bin/bash\n")
    assert len(script.encode()) <= MAX_USER_DATA_BYTES
    bash_n(script, tmp_path, "user-data.sh")
    boot = heredoc(script, "PARM_BOOT_EOF")
    assert boot == render_boot(role, gpu=gpu, **ARGS).rstrip("\n")
    bash_n(boot, tmp_path, "boot.sh")
    assert heredoc(script, "PARM_BOOTSTRAP_EOF") == inspect.getsource(bootstrap).rstrip("\n")
    assert "systemctl enable parm-boot.service" in script
    assert "ExecStart=$PARM_HOME/boot.sh" in script


@pytest.mark.parametrize("role", ["frontend", "worker", "client"])
def test_boot_script_starts_the_services_of_its_role(role):
    gpu = role == "worker"
    boot = render_boot(role, gpu=gpu, **ARGS)
    assert f"ROLE={role}\n" in boot
    assert "EXPERIMENT=fig9a\n" in boot and "BUCKET=parm-123-us-east-1\n" in boot
    assert f"ORT_EXTRA={'gpu' if gpu else 'cpu'}\n" in boot
    # Every role runs the node agent, bound to the private address only.
    assert "-m deploy.remote.agent --host $PRIVATE_IP --port $AGENT_PORT" in boot
    assert "systemctl restart parm-agent.service" in boot
    assert "0.0.0.0" not in boot
    # IMDSv2 only (token first).
    assert "latest/api/token" in boot
    # Install: wheel with the role's extra, source archive as the fallback.
    assert '"${WHEEL}[${ORT_EXTRA}]"' in boot and '"${SOURCE}[${ORT_EXTRA}]"' in boot
    assert boot.index("bootstrap.py") < boot.index("pip install -q --force-reinstall")
    # Only the frontend runs the sweep runner.
    assert ("-m deploy.aws.node runner" in boot) == (role == "frontend")
    assert ("systemctl restart parm-runner.service" in boot) == (role == "frontend")
    # Ready is reported last, after the services are up.
    assert "-m deploy.aws.node ready" in boot
    assert boot.rindex("deploy.aws.node ready") > boot.rindex("systemctl restart")


def test_values_are_shell_quoted():
    boot = render_boot("client", experiment_id="e", bucket="b; rm -rf /", region="r", agent_port=1, gpu=False)
    assert "BUCKET='b; rm -rf /'\n" in boot


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown role"):
        render_user_data("db", gpu=False, **ARGS)
