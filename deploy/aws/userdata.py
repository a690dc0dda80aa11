"""The user data of each role: a bash script that boots the node.

The user data runs once (cloud-init, first boot). It writes
``$PARM_HOME/bootstrap.py`` (``deploy.aws.bootstrap``, verbatim),
``$PARM_HOME/boot.sh`` and a ``parm-boot`` systemd unit that runs
``boot.sh`` at *every* boot, so a stopped instance that is reused comes
back up with the current release. ``boot.sh``:

1. installs Python tooling (apt), makes a venv, fetches the release and the
   artifacts from the experiment's S3 prefix (``bootstrap.py``), installs
   the wheel with the role's ONNX Runtime extra (``gpu`` on GPU types, else
   ``cpu``) — and, if the wheel does not fit this node's Python, builds the
   project from the source archive instead;
2. starts the node agent (``python -m deploy.remote.agent``, a systemd unit bound
   to the instance's private address) on every role: the runner starts the
   registry and the frontend (frontend node), the model servers and shuffle
   agents (workers), and the load generators' control services
   (``python -m loadgen serve``, clients) through it, fresh for every run;
3. on the frontend only, starts the sweep runner
   (``python -m deploy.aws.node runner``, a systemd unit): it waits for a
   sweep request in S3, runs it, and uploads the results;
4. reports ready: ``python -m deploy.aws.node ready`` waits until the local
   agent answers and writes ``ready/<instance-id>.json`` to S3.

``PARM_HOME``, ``PARM_SYSTEMD_DIR`` and ``PARM_LOG_DIR`` default to
``/opt/parm``, ``/etc/systemd/system`` and ``/var/log/parm``; the tests set
them to run the script in a sandbox.
"""

import inspect
import shlex

from deploy.aws import bootstrap

MAX_USER_DATA_BYTES = 16 * 1024  # EC2's limit (before base64)


def _assign(name, value):
    return f"{name}={shlex.quote(str(value))}"


BOOT_BODY = r"""
export AWS_DEFAULT_REGION="$REGION"
export DEBIAN_FRONTEND=noninteractive
PARM_HOME="${PARM_HOME:-/opt/parm}"
PARM_SYSTEMD_DIR="${PARM_SYSTEMD_DIR:-/etc/systemd/system}"
PARM_LOG_DIR="${PARM_LOG_DIR:-/var/log/parm}"
mkdir -p "$PARM_LOG_DIR"
exec >>"$PARM_LOG_DIR/boot.log" 2>&1
echo "parm boot: role $ROLE, experiment $EXPERIMENT, $(date -u +%FT%TZ)"

TOKEN="$(curl -sS -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
imds() { curl -sS -H "X-aws-ec2-metadata-token: $TOKEN" "http://169.254.169.254/latest/meta-data/$1"; }
INSTANCE_ID="$(imds instance-id)"
PRIVATE_IP="$(imds local-ipv4)"

apt-get update -q
apt-get install -y -q python3-venv python3-dev build-essential
python3 -m venv "$PARM_HOME/venv"
PY="$PARM_HOME/venv/bin/python"
"$PY" -m pip install -q --upgrade pip boto3
"$PY" "$PARM_HOME/bootstrap.py" --bucket "$BUCKET" --experiment "$EXPERIMENT" --dest "$PARM_HOME" \
    --region "$REGION" >"$PARM_HOME/release.json"
WHEEL="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["wheel"] or "")' "$PARM_HOME/release.json")"
SOURCE="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"] or "")' "$PARM_HOME/release.json")"
if [ -n "$WHEEL" ] && "$PY" -m pip install -q --force-reinstall "${WHEEL}[${ORT_EXTRA}]"; then
    echo "installed $WHEEL"
elif [ -n "$SOURCE" ]; then
    echo "the wheel does not install here; building from $SOURCE"
    "$PY" -m pip install -q --force-reinstall "${SOURCE}[${ORT_EXTRA}]"
else
    echo "no installable release in s3://$BUCKET/$EXPERIMENT/dist" >&2
    exit 1
fi

cat >"$PARM_SYSTEMD_DIR/parm-agent.service" <<PARM_UNIT_EOF
[Unit]
Description=ParM node agent ($ROLE)
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory=$PARM_HOME
Environment=AWS_DEFAULT_REGION=$REGION
ExecStart=$PY -m deploy.remote.agent --host $PRIVATE_IP --port $AGENT_PORT --log-dir $PARM_LOG_DIR/agent
Restart=always
RestartSec=2
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
PARM_UNIT_EOF
systemctl daemon-reload
systemctl enable parm-agent.service
systemctl restart parm-agent.service
"""

RUNNER_BODY = r"""
cat >"$PARM_SYSTEMD_DIR/parm-runner.service" <<PARM_UNIT_EOF
[Unit]
Description=ParM sweep runner (experiment $EXPERIMENT)
After=parm-agent.service
Requires=parm-agent.service

[Service]
WorkingDirectory=$PARM_HOME
Environment=AWS_DEFAULT_REGION=$REGION
ExecStart=$PY -m deploy.aws.node runner --bucket $BUCKET --experiment $EXPERIMENT --region $REGION --work-dir $PARM_HOME/runs --artifacts $PARM_HOME/artifacts
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
PARM_UNIT_EOF
systemctl daemon-reload
systemctl enable parm-runner.service
systemctl restart parm-runner.service
"""

READY_BODY = r"""
"$PY" -m deploy.aws.node ready --bucket "$BUCKET" --experiment "$EXPERIMENT" --region "$REGION" \
    --role "$ROLE" --instance-id "$INSTANCE_ID" --private-ip "$PRIVATE_IP" --agent-port "$AGENT_PORT"
echo "parm boot: ready, $(date -u +%FT%TZ)"
"""


def render_boot(role, *, experiment_id, bucket, region, agent_port, gpu):
    """``boot.sh`` for ``role`` (runs at every boot)."""
    head = "\n".join([
        "#!/bin/bash",
        f"# ParM node boot ({role}): install from S3, start services, report ready. Runs at every boot.",
        "set -euo pipefail",
        _assign("ROLE", role),
        _assign("EXPERIMENT", experiment_id),
        _assign("BUCKET", bucket),
        _assign("REGION", region),
        _assign("AGENT_PORT", int(agent_port)),
        _assign("ORT_EXTRA", "gpu" if gpu else "cpu"),
    ])
    body = BOOT_BODY + (RUNNER_BODY if role == "frontend" else "") + READY_BODY
    return head + "\n" + body


def render_user_data(role, *, experiment_id, bucket, region, agent_port, gpu):
    """The user data of ``role``: installs ``boot.sh`` as a boot-time unit and starts it."""
    if role not in ("frontend", "worker", "client"):
        raise ValueError(f"unknown role {role!r}")
    boot = render_boot(role, experiment_id=experiment_id, bucket=bucket, region=region,
                       agent_port=agent_port, gpu=gpu)
    source = inspect.getsource(bootstrap)
    for text, marker in ((boot, "PARM_BOOT_EOF"), (source, "PARM_BOOTSTRAP_EOF")):
        if marker in text:
            raise ValueError(f"heredoc marker {marker} occurs in the embedded text")
    script = "\n".join([
        "#!/bin/bash",
        f"# ParM {role} node of experiment {experiment_id} (user data rendered by deploy.aws.userdata)",
        "set -euo pipefail",
        'PARM_HOME="${PARM_HOME:-/opt/parm}"',
        'PARM_SYSTEMD_DIR="${PARM_SYSTEMD_DIR:-/etc/systemd/system}"',
        'mkdir -p "$PARM_HOME"',
        "cat >\"$PARM_HOME/bootstrap.py\" <<'PARM_BOOTSTRAP_EOF'",
        source.rstrip("\n"),
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
