"""The user data of each role: a bash script that boots the node.

The user data runs once (cloud-init, first boot). It writes
``$PARM_HOME/bootstrap.py`` (``deploy.aws.bootstrap``, gzip+base64 to fit
EC2's 16 KB), ``$PARM_HOME/boot.sh`` and a ``parm-boot`` systemd unit that
runs ``boot.sh`` at *every* boot, so a stopped instance that is reused
comes back up with the current release. Only ``parm-boot`` is enabled at
boot: the agent and runner units are started by ``boot.sh`` once the new
install is in place, never by systemd from the previous install.
``boot.sh``:

1. stops (and disables, for fleets of older launches) the agent and runner
   units, so nothing of the previous install runs while it reinstalls;
2. fetches the release, the artifacts and the deployment's TLS files from
   the experiment's S3 prefix with ``bootstrap.py`` (standard library only,
   the image's ``python3``), installs Python tooling (apt, waiting for the
   dpkg lock that first-boot upgrades hold; apt and pip retry), makes a
   *fresh* venv and installs the wheel with the role's extras (workers
   ``cpu`` or ``gpu``, clients ``data``, frontend ``report,deploy``) — or,
   if the wheel does not fit this node's Python, the source archive;
3. runs every service as the unprivileged system user ``parm``: the node
   agent (``python -m deploy.remote.agent``, bound to the private address,
   mutual TLS with the deployment's CA; on GPU workers with
   ``--model-server-provider cuda`` and the CUDA libraries of the ``gpu``
   extra on ``LD_LIBRARY_PATH``) on every role, and the sweep runner
   (``python -m deploy.aws.node runner``) on the frontend;
4. reports ready: ``python -m deploy.aws.node ready`` waits until the local
   agent answers (and, on GPU workers, until ONNX Runtime's CUDA provider
   really runs a model) and writes ``ready/<instance-id>.json`` with this
   boot's id and the execution provider.

If any step fails, a trap writes ``ready/<instance-id>.json`` with state
``failed``, the step and the tail of the boot log (``bootstrap.py
report``), so ``python -m deploy.aws status`` shows why.

``PARM_HOME``, ``PARM_SYSTEMD_DIR``, ``PARM_LOG_DIR`` and ``PARM_USER``
default to ``/opt/parm``, ``/etc/systemd/system``, ``/var/log/parm`` and
``parm``; the tests set them to run the script in a sandbox.
"""

import base64
import gzip
import inspect
import shlex

from deploy.aws import bootstrap

MAX_USER_DATA_BYTES = 16 * 1024  # EC2's limit (before base64)
ROLE_EXTRAS = {"frontend": "report,deploy", "client": "data"}  # workers: "gpu" or "cpu"


def role_extras(role, gpu):
    """The pip extras a node of ``role`` installs."""
    if role == "worker":
        return "gpu" if gpu else "cpu"
    return ROLE_EXTRAS[role]


def _assign(name, value):
    return f"{name}={shlex.quote(str(value))}"


BOOT_BODY = r"""
export AWS_DEFAULT_REGION="$REGION"
export DEBIAN_FRONTEND=noninteractive
PARM_HOME="${PARM_HOME:-/opt/parm}"
PARM_SYSTEMD_DIR="${PARM_SYSTEMD_DIR:-/etc/systemd/system}"
PARM_LOG_DIR="${PARM_LOG_DIR:-/var/log/parm}"
PARM_USER="${PARM_USER:-parm}"
mkdir -p "$PARM_LOG_DIR"
exec >>"$PARM_LOG_DIR/boot.log" 2>&1
echo "parm boot: role $ROLE, experiment $EXPERIMENT, $(date -u +%FT%TZ)"
STEP="start"
INSTANCE_ID="unknown"
S3ARGS=(--bucket "$BUCKET" --experiment "$EXPERIMENT" --region "$REGION" --bucket-owner "$BUCKET_OWNER")

report_failure() {
    local rc=$?
    trap - ERR
    echo "parm boot: FAILED at step '$STEP' (exit $rc), $(date -u +%FT%TZ)"
    python3 "$PARM_HOME/bootstrap.py" report "${S3ARGS[@]}" --role "$ROLE" --instance-id "$INSTANCE_ID" \
        --reason "boot failed at step '$STEP' (exit $rc)" --log "$PARM_LOG_DIR/boot.log" \
        || echo "parm boot: could not write the failure report to S3"
    exit "$rc"
}
trap report_failure ERR

retry() {
    local n=1 rc
    while true; do
        "$@" && return 0
        rc=$?
        if [ "$n" -ge 5 ]; then return "$rc"; fi
        echo "parm boot: retry $n of: $*"
        sleep $((n * 15))
        n=$((n + 1))
    done
}

STEP="stopping the previous install's services"
systemctl stop parm-runner.service parm-agent.service >/dev/null 2>&1 || true
systemctl disable parm-runner.service parm-agent.service >/dev/null 2>&1 || true

STEP="instance metadata"
TOKEN="$(curl -sSf -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
imds() { curl -sSf -H "X-aws-ec2-metadata-token: $TOKEN" "http://169.254.169.254/latest/meta-data/$1"; }
INSTANCE_ID="$(imds instance-id)"
PRIVATE_IP="$(imds local-ipv4)"

STEP="fetching the release from s3://$BUCKET/$EXPERIMENT"
python3 "$PARM_HOME/bootstrap.py" fetch "${S3ARGS[@]}" --dest "$PARM_HOME" >"$PARM_HOME/release.json"

STEP="apt-get"
APT=(apt-get -q -y -o DPkg::Lock::Timeout=1200)
retry "${APT[@]}" update
retry "${APT[@]}" install python3-venv python3-dev build-essential

STEP="service user $PARM_USER"
id -u "$PARM_USER" >/dev/null 2>&1 || useradd --system --home-dir "$PARM_HOME" --shell /usr/sbin/nologin "$PARM_USER"

STEP="installing the release"
rm -rf "$PARM_HOME/venv"
python3 -m venv "$PARM_HOME/venv"
PY="$PARM_HOME/venv/bin/python"
PIP=("$PY" -m pip install -q --retries 10 --timeout 60)
retry "${PIP[@]}" --upgrade pip
WHEEL="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["wheel"] or "")' "$PARM_HOME/release.json")"
SOURCE="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"] or "")' "$PARM_HOME/release.json")"
if [ -n "$WHEEL" ] && retry "${PIP[@]}" --force-reinstall "${WHEEL}[${EXTRAS}]"; then
    echo "installed $WHEEL"
elif [ -n "$SOURCE" ]; then
    echo "the wheel does not install here; building from $SOURCE"
    retry "${PIP[@]}" --force-reinstall "${SOURCE}[${EXTRAS}]"
else
    echo "no installable release in s3://$BUCKET/$EXPERIMENT/dist"
    false
fi
LIBS=""
if [ "$GPU" = 1 ]; then
    # onnxruntime-gpu loads CUDA/cuDNN from the library path: the gpu extra's nvidia-* wheels.
    LIBS="$("$PY" -c 'import glob, os, sysconfig; print(":".join(sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib")))))')"
fi

STEP="permissions"
mkdir -p "$PARM_HOME/runs" "$PARM_LOG_DIR/agent"
chown -R "$PARM_USER" "$PARM_HOME/runs" "$PARM_HOME/tls" "$PARM_LOG_DIR/agent"
chmod 0700 "$PARM_HOME/tls"
TLS=""
if [ -f "$PARM_HOME/tls/ca.pem" ]; then
    TLS="--tls-cert $PARM_HOME/tls/node.pem --tls-key $PARM_HOME/tls/node.key --tls-ca $PARM_HOME/tls/ca.pem --tls-client-auth"
fi
PROVIDER=""
if [ "$GPU" = 1 ]; then PROVIDER="--model-server-provider cuda"; fi

STEP="starting the node agent"
cat >"$PARM_SYSTEMD_DIR/parm-agent.service" <<PARM_UNIT_EOF
[Unit]
Description=ParM node agent ($ROLE)
After=network-online.target
Wants=network-online.target

[Service]
User=$PARM_USER
NoNewPrivileges=true
WorkingDirectory=$PARM_HOME/runs
Environment=AWS_DEFAULT_REGION=$REGION
Environment=LD_LIBRARY_PATH=$LIBS
ExecStart=$PY -m deploy.remote.agent --host $PRIVATE_IP --port $AGENT_PORT --log-dir $PARM_LOG_DIR/agent $TLS $PROVIDER
Restart=always
RestartSec=2
LimitNOFILE=65536
PARM_UNIT_EOF
systemctl daemon-reload
systemctl restart parm-agent.service
"""

RUNNER_BODY = r"""
STEP="starting the sweep runner"
cat >"$PARM_SYSTEMD_DIR/parm-runner.service" <<PARM_UNIT_EOF
[Unit]
Description=ParM sweep runner (experiment $EXPERIMENT)
After=parm-agent.service
Requires=parm-agent.service

[Service]
User=$PARM_USER
NoNewPrivileges=true
WorkingDirectory=$PARM_HOME/runs
Environment=AWS_DEFAULT_REGION=$REGION
Environment=PARM_AGENT_TLS_DIR=$PARM_HOME/tls
ExecStart=$PY -m deploy.aws.node runner --bucket $BUCKET --bucket-owner $BUCKET_OWNER --experiment $EXPERIMENT --region $REGION --work-dir $PARM_HOME/runs --artifacts $PARM_HOME/artifacts --instance-id $INSTANCE_ID
Restart=on-failure
RestartSec=10
PARM_UNIT_EOF
systemctl daemon-reload
systemctl restart parm-runner.service
"""

READY_BODY = r"""
STEP="ready report"
trap - ERR
READY=(--bucket "$BUCKET" --bucket-owner "$BUCKET_OWNER" --experiment "$EXPERIMENT" --region "$REGION"
       --role "$ROLE" --instance-id "$INSTANCE_ID" --private-ip "$PRIVATE_IP" --agent-port "$AGENT_PORT"
       --tls-dir "$PARM_HOME/tls" --artifacts "$PARM_HOME/artifacts")
if [ "$GPU" = 1 ]; then READY+=(--require-provider cuda); fi
if ! runuser -u "$PARM_USER" -- env LD_LIBRARY_PATH="$LIBS" AWS_DEFAULT_REGION="$REGION" \
        "$PY" -m deploy.aws.node ready "${READY[@]}"; then
    echo "parm boot: the node is not ready (see its report), $(date -u +%FT%TZ)"
    exit 1
fi
echo "parm boot: ready, $(date -u +%FT%TZ)"
"""


def render_boot(role, *, experiment_id, bucket, region, agent_port, gpu, bucket_owner=""):
    """``boot.sh`` for ``role`` (runs at every boot)."""
    if role not in ("frontend", "worker", "client"):
        raise ValueError(f"unknown role {role!r}")
    head = "\n".join([
        "#!/bin/bash",
        f"# ParM node boot ({role}): install from S3, start services, report ready. Runs at every boot.",
        "set -Eeuo pipefail",
        _assign("ROLE", role),
        _assign("EXPERIMENT", experiment_id),
        _assign("BUCKET", bucket),
        _assign("BUCKET_OWNER", bucket_owner),
        _assign("REGION", region),
        _assign("AGENT_PORT", int(agent_port)),
        _assign("EXTRAS", role_extras(role, gpu)),
        _assign("GPU", 1 if gpu else 0),
    ])
    body = BOOT_BODY + (RUNNER_BODY if role == "frontend" else "") + READY_BODY
    return head + "\n" + body


def packed_bootstrap():
    """``deploy.aws.bootstrap``'s source, gzip-compressed and base64-encoded (76-column lines)."""
    data = base64.encodebytes(gzip.compress(inspect.getsource(bootstrap).encode(), mtime=0)).decode()
    return data.rstrip("\n")


def render_user_data(role, *, experiment_id, bucket, region, agent_port, gpu, bucket_owner=""):
    """The user data of ``role``: installs ``boot.sh`` as a boot-time unit and starts it."""
    boot = render_boot(role, experiment_id=experiment_id, bucket=bucket, region=region,
                       agent_port=agent_port, gpu=gpu, bucket_owner=bucket_owner)
    if "PARM_BOOT_EOF" in boot:
        raise ValueError("heredoc marker PARM_BOOT_EOF occurs in the boot script")
    script = "\n".join([
        "#!/bin/bash",
        f"# ParM {role} node of experiment {experiment_id} (user data rendered by deploy.aws.userdata)",
        "set -euo pipefail",
        'PARM_HOME="${PARM_HOME:-/opt/parm}"',
        'PARM_SYSTEMD_DIR="${PARM_SYSTEMD_DIR:-/etc/systemd/system}"',
        'mkdir -p "$PARM_HOME"',
        "base64 -d <<'PARM_BOOTSTRAP_EOF' | gunzip >\"$PARM_HOME/bootstrap.py\"",
        packed_bootstrap(),
        "PARM_BOOTSTRAP_EOF",
        "cat >\"$PARM_HOME/boot.sh\" <<'PARM_BOOT_EOF'",
        boot.rstrip("\n"),
        "PARM_BOOT_EOF",
        'chmod 0755 "$PARM_HOME/boot.sh"',
        "cat >\"$PARM_SYSTEMD_DIR/parm-boot.service\" <<PARM_UNIT_EOF",
        "[Unit]",
        f"Description=ParM node boot ({role})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        "Environment=PARM_HOME=$PARM_HOME",
        "ExecStart=$PARM_HOME/boot.sh",
        "TimeoutStartSec=3600",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "PARM_UNIT_EOF",
        "systemctl daemon-reload",
        "systemctl enable parm-boot.service",
        "systemctl start --no-block parm-boot.service",
        "",
    ])
    if len(script.encode()) > MAX_USER_DATA_BYTES:
        raise ValueError(f"user data of {role} is {len(script.encode())} bytes, over EC2's {MAX_USER_DATA_BYTES}")
    return script
