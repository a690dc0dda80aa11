"""User data per role: valid bash, the right services, the embedded bootstrap."""

import base64
import gzip
import inspect
import re
import subprocess

import pytest

from deploy.aws import bootstrap
from deploy.aws.userdata import MAX_USER_DATA_BYTES, render_boot, render_user_data, role_extras

ARGS = dict(experiment_id="fig9a", bucket="parm-123-us-east-1", region="us-east-1", agent_port=7070,
            bucket_owner="123456789012")


def heredoc(script, marker):
    match = re.search(rf"<<'{marker}'[^\n]*\n(.*?)\n{marker}\n", script, re.S)
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
    packed = heredoc(script, "PARM_BOOTSTRAP_EOF")
    assert gzip.decompress(base64.b64decode(packed)).decode() == inspect.getsource(bootstrap)
    assert "systemctl enable parm-boot.service" in script
    assert "ExecStart=$PARM_HOME/boot.sh" in script


@pytest.mark.parametrize("role", ["frontend", "worker", "client"])
def test_boot_script_starts_the_services_of_its_role(role):
    gpu = role == "worker"
    boot = render_boot(role, gpu=gpu, **ARGS)
    assert f"ROLE={role}\n" in boot
    assert "EXPERIMENT=fig9a\n" in boot and "BUCKET=parm-123-us-east-1\n" in boot
    assert "BUCKET_OWNER=123456789012\n" in boot
    assert f"EXTRAS={role_extras(role, gpu)}\n" in boot
    # Every role runs the node agent, bound to the private address only, as the unprivileged user.
    assert "-m deploy.remote.agent --host $PRIVATE_IP --port $AGENT_PORT" in boot
    assert "systemctl restart parm-agent.service" in boot
    assert "User=$PARM_USER" in boot and "useradd --system" in boot
    assert "0.0.0.0" not in boot
    # IMDSv2 only (token first).
    assert "latest/api/token" in boot
    # Install: wheel with the role's extras, source archive as the fallback, into a fresh venv.
    assert '"${WHEEL}[${EXTRAS}]"' in boot and '"${SOURCE}[${EXTRAS}]"' in boot
    assert boot.index("bootstrap.py\" fetch") < boot.index('rm -rf "$PARM_HOME/venv"') < boot.index("--force-reinstall")
    # Only the frontend runs the sweep runner.
    assert ("-m deploy.aws.node runner" in boot) == (role == "frontend")
    assert ("systemctl restart parm-runner.service" in boot) == (role == "frontend")
    # Ready is reported last, after the services are up.
    assert "-m deploy.aws.node ready" in boot
    assert boot.rindex("deploy.aws.node ready") > boot.rindex("systemctl restart")


def test_extras_by_role():
    assert [role_extras("worker", True), role_extras("worker", False), role_extras("client", False),
            role_extras("frontend", False)] == ["gpu", "cpu", "data", "report,deploy"]
    for role, gpu in (("worker", False), ("client", False), ("frontend", False)):
        assert "train" not in role_extras(role, gpu)


def test_restart_runs_only_the_new_install():
    """Item 5: only the boot unit is enabled; the old agent/runner are stopped before reinstalling."""
    for role in ("frontend", "worker"):
        boot = render_boot(role, gpu=False, **ARGS)
        assert "systemctl enable parm-agent" not in boot and "systemctl enable parm-runner" not in boot
        assert "[Install]" not in boot  # the agent/runner units cannot be enabled at boot
        stop = boot.index("systemctl stop parm-runner.service parm-agent.service")
        assert stop < boot.index("bootstrap.py\" fetch") < boot.index("systemctl restart parm-agent.service")


def test_failed_boot_is_reported_and_apt_pip_retry():
    """Item 6: an ERR trap writes a failed ready report with the log tail; apt waits for the lock."""
    boot = render_boot("worker", gpu=True, **ARGS)
    assert boot.startswith("#!/bin/bash\n") and "set -Eeuo pipefail" in boot
    assert "trap report_failure ERR" in boot
    assert 'bootstrap.py" report "${S3ARGS[@]}"' in boot and '--log "$PARM_LOG_DIR/boot.log"' in boot
    assert "DPkg::Lock::Timeout=" in boot
    assert 'retry "${APT[@]}" update' in boot and 'retry "${APT[@]}" install' in boot
    assert 'retry "${PIP[@]}" --force-reinstall "${WHEEL}[${EXTRAS}]"' in boot
    assert "--retries 10" in boot


def test_gpu_workers_require_cuda():
    """Item 3: model servers forced to CUDA, the ready check requires it, the libraries are on the path."""
    gpu = render_boot("worker", gpu=True, **ARGS)
    cpu = render_boot("worker", gpu=False, **ARGS)
    assert "GPU=1\n" in gpu and "GPU=0\n" in cpu
    for text in ('PROVIDER="--model-server-provider cuda"', "READY+=(--require-provider cuda)",
                 "Environment=LD_LIBRARY_PATH=$LIBS", '"nvidia", "*", "lib"'):
        assert text in gpu


def test_agent_and_runner_use_the_deployments_tls():
    boot = render_boot("frontend", gpu=False, **ARGS)
    assert "--tls-ca $PARM_HOME/tls/ca.pem --tls-client-auth" in boot
    assert "Environment=PARM_AGENT_TLS_DIR=$PARM_HOME/tls" in boot
    assert '--tls-dir "$PARM_HOME/tls"' in boot


def test_values_are_shell_quoted():
    boot = render_boot("client", experiment_id="e", bucket="b; rm -rf /", region="r", agent_port=1, gpu=False)
    assert "BUCKET='b; rm -rf /'\n" in boot


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown role"):
        render_user_data("db", gpu=False, **ARGS)
