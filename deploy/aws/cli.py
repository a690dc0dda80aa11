"""``python -m deploy.aws launch|status|results|terminate`` (see docs/aws.md).

- ``launch CONFIG [--dry-run] [--yes] [--keep-running] [--keep-partial]``:
  plan the fleet, check it (instance types, images, quotas), upload the
  release, artifacts and the deployment's TLS files, set up bucket, IAM
  profile and security group, reuse or launch instances, write
  ``fleet.json`` and a sweep request that the frontend node's runner picks
  up (unless that sweep is still running). ``--dry-run`` prints the plan
  (instances by role and type, what is reused, estimated cost, the vCPU
  quota, zones, the EBS cost of the stopped fleet) and calls only
  read-only APIs (or none, without credentials).
- ``status [CONFIG]``: the project's instances (of one experiment), their
  ready reports (failed nodes with their reason) and the sweep's state.
- ``results CONFIG``: downloads the latest sweep's results and prints them.
- ``terminate CONFIG [--stop] [--cleanup]``: terminates (or stops) the
  experiment's instances; ``--cleanup`` also removes its security group,
  IAM role and (if empty) the bucket.

Every mistake or AWS failure is one line on stderr and a non-zero exit:
2 for usage and config errors, 1 for AWS errors.
"""

import json
import pathlib
import subprocess
import sys
import tempfile
import time

from deploy.aws import iam, instances, network, plan as plan_mod, prices, settings as settings_mod, storage, userdata
from deploy.aws.session import AwsError, Clients, aws_errors
from deploy.runner import config as config_mod
from services.common import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROG = "python -m deploy.aws"
# What the wheel and the source archive are built from (untracked files there are in neither archive).
PACKAGE_PATHS = ("coding_ext", "services", "models", "loadgen", "deploy", "protos", "configs", "setup.py",
                 "pyproject.toml")
# GPU families that current deep-learning images no longer drive, and what to use instead.
OLD_GPU_FAMILIES = {"p2": "g4dn.xlarge", "p3": "g4dn.xlarge"}
ACTIVE_SWEEP_STATES = ("waiting for nodes", "waiting for agents", "running", "uploading")
TLS_FILES = ("ca.pem", "node.pem", "node.key")


def build_parser():
    p = cli.ArgumentParser(prog=PROG, description="Run a ParM sweep on EC2 instances.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)

    launch = sub.add_parser("launch", help="launch or reuse the fleet and start the sweep")
    launch.add_argument("config", help="sweep config, e.g. configs/fig9a.json (or its name: fig9a)")
    launch.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    launch.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    launch.add_argument("--wheel", default=None, help="prebuilt project wheel (default: build one)")
    launch.add_argument("--source-archive", default=None,
                        help="source .tar.gz for nodes the wheel does not fit (default: git archive HEAD)")
    launch.add_argument("--artifacts", default="artifacts", help="artifacts directory to upload")
    launch.add_argument("--no-run", action="store_true", help="launch only; do not request a sweep")
    launch.add_argument("--keep-running", action="store_true",
                        help="leave the fleet running after the sweep (default: it stops itself)")
    launch.add_argument("--keep-partial", action="store_true",
                        help="keep the instances of a launch that failed part-way (default: terminate them)")
    settings_mod.add_arguments(launch)

    status = sub.add_parser("status", help="list the fleet(s)")
    status.add_argument("config", nargs="?", default=None, help="only this experiment's instances")
    settings_mod.add_arguments(status)

    results = sub.add_parser("results", help="download and print the sweep's results")
    results.add_argument("config")
    results.add_argument("--out", default="results/aws", help="download into OUT/EXPERIMENT/REQUEST_ID")
    settings_mod.add_arguments(results)

    term = sub.add_parser("terminate", help="terminate (or stop) the experiment's instances")
    term.add_argument("config")
    term.add_argument("--stop", action="store_true", help="stop instead of terminating (on-demand only)")
    term.add_argument("--cleanup", action="store_true",
                      help="also remove the security group, the IAM role and (if empty) the bucket")
    settings_mod.add_arguments(term)
    return p


def load_config(name):
    """A config path, or a bare name looked up as configs/NAME.json."""
    path = pathlib.Path(name)
    if not path.exists() and not path.suffix:
        candidate = REPO_ROOT / "configs" / f"{name}.json"
        if candidate.exists():
            path = candidate
    return config_mod.load(path), path


def experiment_of(name):
    """The experiment id of a config path or name (status/results/terminate)."""
    return load_config(name)[0].experiment_id


def _bucket(clients):
    return clients.settings.bucket or storage.default_bucket(clients.account_id(), clients.settings.region)


# -- checks shared by the dry run and the launch -------------------------------------------------

def check_types(fleet_plan, settings):
    """``PlanError`` for GPU types that current images do not drive (p2/p3 without ``--ami``)."""
    if settings.ami:
        return
    for g in fleet_plan.groups:
        family = g.instance_type.split(".")[0]
        if family in OLD_GPU_FAMILIES:
            raise plan_mod.PlanError(
                f"{g.role} type {g.instance_type}: current deep-learning GPU images no longer drive its GPU "
                f"({family}); use --{g.role}-type {OLD_GPU_FAMILIES[family]} (or give --ami with a driver for it)")


def untracked_note(repo=REPO_ROOT):
    """A note when files under the packages are untracked (the nodes' source archive lacks them), else None."""
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "--others", "--exclude-standard", "--",
                           *PACKAGE_PATHS], capture_output=True, text=True)
    files = proc.stdout.split() if proc.returncode == 0 else []
    if not files:
        return None
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return (f"{len(files)} untracked file(s) under the packages are NOT in the nodes' source archive "
            f"(git archive of the commit): {shown}; commit them (or `git add`) before launching")


def _zone_notes(fleet_plan, reuse, zones):
    zones_used = sorted({i["Placement"]["AvailabilityZone"] for insts in reuse.reuse.values() for i in insts})
    notes = []
    if len(zones_used) > 1:
        notes.append(f"WARNING: the reused instances span zones {', '.join(zones_used)}: cross-zone traffic "
                     "adds latency and costs; terminate them to start in one zone")
    elif zones_used and zones_used[0] not in zones:
        notes.append(f"WARNING: the reused instances are in {zones_used[0]}, which does not offer every type; "
                     "new ones go elsewhere and the fleet will span zones")
    elif len(zones) > 1:
        notes.append(f"the fleet goes into one zone ({zones_used[0] if zones_used else zones[0]} first); if it lacks "
                     "capacity for a role, that role goes to the next zone and the fleet spans zones")
    return notes


def _ebs_note(fleet_plan, volume_gb):
    total = sum(g.count * volume_gb[g.role] for g in fleet_plan.groups)
    monthly = prices.ebs_monthly_usd(total)
    return (f"a stopped fleet still costs its root volumes: {total} GB gp3 = {monthly:.2f} USD/month "
            f"({monthly / 30:.2f} USD/day); `make aws-terminate` removes them")


# -- launch ------------------------------------------------------------------------------------

def dry_run(sweep, settings, clients, out):
    """Prints the plan using read-only calls only (none without credentials)."""
    fleet_plan = plan_mod.plan_fleet(sweep, settings)
    check_types(fleet_plan, settings)
    notes = [n for n in (untracked_note(),) if n]
    try:
        clients.account_id()
    except AwsError as exc:
        notes.append(f"reuse, zones, images and quotas not checked: {exc}")
        print(plan_mod.format_plan(fleet_plan, settings, notes=notes), file=out)
        return 0
    try:
        info = network.instance_type_info(clients, fleet_plan.instance_types)
        network.check_key_pair(clients)
        zones = network.candidate_zones(clients, fleet_plan.instance_types)
    except AwsError:
        # The plan is still worth seeing; the error follows on stderr (exit 1).
        print(plan_mod.format_plan(fleet_plan, settings, notes=notes), file=out)
        raise
    notes.append(f"zones to try, in order: {', '.join(zones)}")
    volume_gb = {}
    for role in plan_mod.ROLES:
        gpu = info[fleet_plan.group(role).instance_type]["gpus"] > 0
        try:
            ami = network.resolve_ami(clients, gpu)
            volume_gb[role] = network.root_volume_gb(clients, ami)
            notes.append(f"{role} image: {ami}, root volume {volume_gb[role]} GB (encrypted)")
        except AwsError as exc:
            volume_gb[role] = settings.volume_size_gb
            notes.append(f"{role} image: {exc}")
    notes.extend(network.vcpu_quota_notes(clients, fleet_plan, info))
    existing = instances.list_instances(clients, sweep.experiment_id)
    reuse = instances.select_reuse(existing, fleet_plan)
    notes.extend(_zone_notes(fleet_plan, reuse, zones))
    notes.extend(f"not reused: {i['InstanceId']} ({i['State']['Name']}) {why}" for i, why in reuse.skipped)
    if not settings.key_name:
        ssh = "none (no --key-name)"
    elif settings.ssh_cidr == "none":
        ssh = "none"
    else:
        ssh = "from " + ("your public address/32" if settings.ssh_cidr == "auto" else settings.ssh_cidr)
    notes.append(f"bucket: {_bucket(clients)}, security group: {network.security_group_name(sweep.experiment_id)}"
                 f", SSH: {ssh}")
    notes.append(_ebs_note(fleet_plan, volume_gb))
    print(plan_mod.format_plan(fleet_plan, settings, reuse=reuse.reuse, notes=notes), file=out)
    return 0


def build_wheel(out_dir):
    """Builds the project wheel (compiles the kernels, generates protos) -> its path."""
    out_dir = pathlib.Path(out_dir)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir),
                           str(REPO_ROOT)], capture_output=True, text=True)
    wheels = sorted(out_dir.glob("parm-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AwsError(f"building the wheel failed: {tail[0]}")
    return wheels[-1]


def source_archive(out_dir):
    """``git archive HEAD`` as parm-src.tar.gz -> (path, note about uncommitted changes or None)."""
    path = pathlib.Path(out_dir) / "parm-src.tar.gz"
    proc = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", "--prefix=parm-src/",
                           "-o", str(path), "HEAD"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AwsError(f"git archive failed: {proc.stderr.strip() or proc.returncode}")
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    note = "uncommitted changes are in the wheel but not in the source archive" if dirty else None
    return path, note


def ensure_tls(clients, bucket, experiment_id):
    """The deployment's CA and node key under ``EXP/tls/`` (made once, kept for reused nodes) -> changes."""
    from deploy.certs import make_certs
    from deploy.remote.agent import TLS_SERVER_NAME

    prefix = storage.key(experiment_id, storage.TLS_PREFIX)
    have = {k.rsplit("/", 1)[-1] for k in storage.list_keys(clients, bucket, prefix + "/")}
    if set(TLS_FILES) <= have:
        return []
    with tempfile.TemporaryDirectory(prefix="parm-tls-") as tmp:
        certs = make_certs(tmp, hosts=(TLS_SERVER_NAME,), days=365, name=f"parm-{experiment_id}")
        for name, path in (("ca.pem", certs.ca), ("node.pem", certs.node_cert), ("node.key", certs.node_key)):
            storage.upload_file(clients, bucket, f"{prefix}/{name}", path, skip_unchanged=False)
    return [f"made the deployment's CA and node certificate (s3://{bucket}/{prefix}/, node role only; "
            "the CA key was not kept)"]


def sweep_in_progress(clients, bucket, experiment_id, reuse):
    """The id of a sweep the running frontend is still working on, or None."""
    frontends = reuse.reuse.get("frontend", [])
    if not frontends or frontends[0]["State"]["Name"] != "running":
        return None  # a stopped frontend runs nothing
    request = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "request.json")) or {}
    status = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "status.json")) or {}
    # (A request the runner has not picked up yet may be replaced: request.json is one slot, not a queue.)
    if request.get("id") and status.get("id") == request["id"] and status.get("state") in ACTIVE_SWEEP_STATES:
        return request["id"]
    return None


def _where(clients, experiment_id):
    """"In REGION: ..." naming the experiment's instances that exist there now."""
    region = clients.settings.region
    try:
        found = instances.list_instances(clients, experiment_id)
    except AwsError as exc:
        return f"could not list the instances in {region}: {exc}"
    if not found:
        return f"no instances of {experiment_id} in {region}"
    return (f"instances of {experiment_id} in {region}: "
            + ", ".join(f"{i['InstanceId']} ({i['State']['Name']})" for i in found)
            + " (`make aws-terminate` removes them)")


def launch(sweep, config_path, args, settings, clients, out, confirm=None):
    """The real launch (see the module doc) -> exit code."""
    check_types(plan_mod.plan_fleet(sweep, settings), settings)  # before any AWS call
    clients.account_id()  # no credentials: that, and nothing else, is the message
    try:
        return _launch(sweep, config_path, args, settings, clients, out, confirm)
    except instances.LaunchFailed:
        raise
    except AwsError as exc:
        raise AwsError(f"{exc}. {_where(clients, sweep.experiment_id)}") from None


def _require_cryptography():
    try:
        import cryptography  # noqa: F401 - deploy.certs makes the deployment's CA with it
    except ImportError:
        raise AwsError("making the deployment's CA needs the cryptography package: pip install cryptography "
                       "(part of the deploy extra)") from None


def _launch(sweep, config_path, args, settings, clients, out, confirm):
    fleet_plan = plan_mod.plan_fleet(sweep, settings)
    check_types(fleet_plan, settings)
    _require_cryptography()  # before anything is created
    exp = sweep.experiment_id
    bucket = _bucket(clients)
    account = clients.account_id()
    info = network.instance_type_info(clients, fleet_plan.instance_types)
    network.check_key_pair(clients)
    zones = network.candidate_zones(clients, fleet_plan.instance_types)
    place = network.placement(clients, zones)
    gpu = {g.role: info[g.instance_type]["gpus"] > 0 for g in fleet_plan.groups}
    amis = {role: network.resolve_ami(clients, gpu[role]) for role in plan_mod.ROLES}
    ssh_cidr = network.resolve_ssh_cidr(settings)
    reuse = instances.select_reuse(instances.list_instances(clients, exp), fleet_plan)
    notes = [n for n in (untracked_note(),) if n]
    notes.extend(_zone_notes(fleet_plan, reuse, zones))
    notes.extend(f"not reused: {i['InstanceId']} ({i['State']['Name']}) {why}" for i, why in reuse.skipped)
    volume_gb = {role: network.root_volume_gb(clients, amis[role]) for role in plan_mod.ROLES}
    notes.append(_ebs_note(fleet_plan, volume_gb))
    if not args.keep_running:
        notes.append("the fleet stops itself once the sweep's results are uploaded (--keep-running: it does not)")
    print(plan_mod.format_plan(fleet_plan, settings, reuse=reuse.reuse, notes=notes), file=out)
    if confirm is not None and not confirm():
        print("not launched", file=out)
        return 1

    def step(message):
        print(message, file=out, flush=True)

    for change in storage.ensure_bucket(clients, bucket, user_given=bool(settings.bucket)):
        step(change)
    running = None if args.no_run else sweep_in_progress(clients, bucket, exp, reuse)
    with tempfile.TemporaryDirectory(prefix="parm-release-") as tmp:
        wheel = pathlib.Path(args.wheel) if args.wheel else build_wheel(tmp)
        if args.source_archive:
            source, note = pathlib.Path(args.source_archive), None
        else:
            source, note = source_archive(tmp)
        if note:
            step(f"note: {note}")
        for path in (wheel, source):
            if not path.is_file():
                raise AwsError(f"{path} is not a file")
        release = storage.upload_release(clients, bucket, exp, wheel, source)
    step(f"uploaded release to s3://{bucket}/{exp}/dist: {', '.join(release.values())}")
    artifacts = pathlib.Path(args.artifacts)
    if artifacts.is_dir():
        up, same = storage.upload_dir(clients, bucket, storage.key(exp, "artifacts"), artifacts)
        step(f"artifacts: {up} uploaded, {same} unchanged")
    else:
        step(f"note: no artifacts directory {artifacts}; nodes get none (run `make models` first)")
    storage.put_json(clients, bucket, storage.key(exp, "config.json"), json.loads(pathlib.Path(config_path).read_text()))
    profile, changes = iam.ensure_instance_profile(clients, bucket, exp)
    for change in changes:
        step(change)
    for change in storage.ensure_bucket_policy(clients, bucket, experiment_id=exp,
                                               node_role_arn=iam.role_arn(account, exp)):
        step(change)
    for change in ensure_tls(clients, bucket, exp):
        step(change)
    group_id, changes = network.ensure_security_group(clients, exp, place.vpc_id, ssh_cidr)
    for change in changes:
        step(change)
    user_data = {role: userdata.render_user_data(role, experiment_id=exp, bucket=bucket, region=settings.region,
                                                 agent_port=settings.agent_port, gpu=gpu[role],
                                                 bucket_owner=clients.bucket_owner())
                 for role in plan_mod.ROLES}

    def forget_ready(ids):
        # Reports of an earlier boot must not count as ready in the coming one.
        storage.delete_keys(clients, bucket, [storage.key(exp, "ready", f"{i}.json") for i in ids])

    fleet = instances.launch_fleet(clients, fleet_plan, reuse, amis=amis, user_data=user_data,
                                   security_group_id=group_id, instance_profile=profile, subnets=place.subnets,
                                   keep_partial=args.keep_partial, before_start=forget_ready)
    all_ids = [i for ids in fleet.values() for i in ids]
    described = {i["InstanceId"]: i for i in instances.wait_running(clients, all_ids)}
    roles = {role: [described[i].get("PrivateIpAddress", "") for i in ids] for role, ids in fleet.items()}
    storage.put_json(clients, bucket, storage.key(exp, "fleet.json"), {
        "experiment_id": exp, "agent_port": settings.agent_port, "roles": roles, "instances": fleet,
        "market": settings.market, "region": settings.region,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    for role in plan_mod.ROLES:
        step(f"{role}: {', '.join(fleet[role])}")
    if running:
        step(f"sweep {running} is still in progress on the running fleet: no second sweep requested "
             "(`make aws-status`)")
    elif not args.no_run:
        request_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        storage.put_json(clients, bucket, storage.key(exp, "control", "request.json"), {
            "id": request_id, "config": json.loads(pathlib.Path(config_path).read_text()),
            "command": settings.runner_command, "keep_running": bool(args.keep_running),
        })
        step(f"requested sweep {request_id}; the frontend node runs it once every node reported ready")
    step(f"next: `make aws-status`, `make aws-results CONFIG={args.config}`, `make aws-terminate CONFIG={args.config}`")
    return 0


# -- status / results / terminate ----------------------------------------------------------------

def status(clients, experiment_id, out):
    found = instances.list_instances(clients, experiment_id)
    if not found:
        print("no instances" + (f" of experiment {experiment_id}" if experiment_id else ""), file=out)
        return 0
    bucket = _bucket(clients)
    have_bucket = storage.bucket_exists(clients, bucket)
    ready, failed = {}, []
    for exp in sorted({instances.tag(i, instances.TAG_EXPERIMENT) for i in found}):
        if have_bucket:
            for k in storage.list_keys(clients, bucket, storage.key(exp, "ready") + "/"):
                report = storage.get_json(clients, bucket, k) or {}
                state = report.get("state", "?")
                if report.get("execution_provider"):
                    state += f" ({report['execution_provider'].replace('ExecutionProvider', '')})"
                ready[report.get("instance_id")] = state
                if report.get("state") == "failed":
                    failed.append(report)
    print(f"{'EXPERIMENT':<14} {'ROLE':<9} {'INSTANCE':<20} {'TYPE':<13} {'STATE':<13} {'MARKET':<9} "
          f"{'ZONE':<12} {'PRIVATE IP':<15} {'PUBLIC IP':<15} BOOT", file=out)
    for i in found:
        print(f"{instances.tag(i, instances.TAG_EXPERIMENT):<14} {instances.tag(i, instances.TAG_ROLE):<9} "
              f"{i['InstanceId']:<20} {i['InstanceType']:<13} {i['State']['Name']:<13} "
              f"{i.get('InstanceLifecycle', 'on-demand'):<9} {i['Placement']['AvailabilityZone']:<12} "
              f"{i.get('PrivateIpAddress', '-'):<15} {i.get('PublicIpAddress', '-'):<15} "
              f"{ready.get(i['InstanceId'], 'booting')}", file=out)
    for report in failed:
        print(f"\nFAILED {report.get('role', '?')} {report.get('instance_id')}: {report.get('reason', '?')}", file=out)
        tail = report.get("log_tail", "").strip().splitlines()[-10:]
        for line in tail:
            print(f"  | {line}", file=out)
    if experiment_id and have_bucket:
        sweep = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "status.json"))
        if sweep:
            detail = "".join(f", {k} {sweep[k]}" for k in ("returncode", "reason", "outcome") if k in sweep)
            print(f"sweep {sweep.get('id')}: {sweep.get('state')} at {sweep.get('time')}{detail}", file=out)
    return 0


def results(clients, experiment_id, out_root, out):
    bucket = _bucket(clients)
    request = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "request.json"))
    if request is None:
        raise AwsError(f"no sweep of experiment {experiment_id} was requested in s3://{bucket}")
    request_id = request["id"]
    state = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "status.json")) or {}
    if state.get("id") != request_id:
        state = {"state": "not started (the frontend node is booting or waiting for its fleet)"}
    dest = pathlib.Path(out_root) / experiment_id / request_id
    files = storage.download_prefix(clients, bucket, storage.key(experiment_id, "results", request_id), dest)
    detail = ", ".join(f"{k} {v}" for k, v in state.items() if k in ("returncode", "reason"))
    print(f"sweep {request_id}: {state.get('state')}" + (f" ({detail})" if detail else ""), file=out)
    print(f"{len(files)} file(s) in {dest}", file=out)
    reports = sorted(p for p in files if p.name == "report.md")
    for report in reports:
        print(f"\n== {report.relative_to(dest)}\n{report.read_text()}", file=out)
    if not reports:
        for summary in sorted(p for p in files if p.name == "summary.json"):
            print(f"{summary.relative_to(dest)}", file=out)
    return 0


def terminate(clients, experiment_id, stop, cleanup, out):
    region = clients.settings.region
    changed = instances.terminate(clients, experiment_id, stop=stop)
    if not changed and not instances.list_instances(clients, experiment_id):
        elsewhere = network.regions_with_instances(clients, experiment_id)
        if elsewhere:
            where = ", ".join(f"{r} ({n})" for r, n in elsewhere)
            raise AwsError(f"no instances of experiment {experiment_id} in {region}; it has instances in {where}: "
                           f"give --region {elsewhere[0][0]}")
    if not changed:
        print(f"no instances of experiment {experiment_id} in {region} to {'stop' if stop else 'terminate'}",
              file=out)
    for instance_id, before, after in changed:
        print(f"{instance_id}: {before} -> {after}", file=out)
    if cleanup:
        for change in cleanup_resources(clients, experiment_id, [c[0] for c in changed]):
            print(change, file=out)
    return 0


def cleanup_resources(clients, experiment_id, terminated):
    """Removes the security group, the IAM role, the TLS files and the bucket if empty -> changes."""
    changes = []
    if terminated:
        with aws_errors("waiting for the instances to terminate: "):
            clients.ec2.get_waiter("instance_terminated").wait(
                InstanceIds=terminated, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    left = [i["InstanceId"] for i in instances.list_instances(clients, experiment_id)]
    if left:
        raise AwsError(f"instances of {experiment_id} still exist in {clients.settings.region}: {', '.join(left)}; "
                       "nothing else was removed")
    changes.extend(network.delete_security_groups(clients, experiment_id))
    changes.extend(iam.delete_instance_profile(clients, experiment_id))
    bucket = _bucket(clients)
    if storage.bucket_exists(clients, bucket):
        tls_keys = storage.list_keys(clients, bucket, storage.key(experiment_id, storage.TLS_PREFIX) + "/")
        if tls_keys:
            storage.delete_keys(clients, bucket, tls_keys)
            changes.append(f"deleted the deployment's TLS files from s3://{bucket}/{experiment_id}/tls/")
        if clients.settings.bucket:
            changes.append(f"kept bucket {bucket} (given with --bucket)")
        else:
            deleted, n = storage.delete_bucket_if_empty(clients, bucket)
            changes.append(f"deleted bucket {bucket}" if deleted else
                           f"kept bucket {bucket}: it holds {n}{'+' if n >= 1000 else ''} object(s) (results); "
                           f"delete them with `aws s3 rm --recursive s3://{bucket}/{experiment_id}` first")
    return changes


# -- entry point ---------------------------------------------------------------------------------

def _main(argv, out, session):
    from botocore.exceptions import BotoCoreError, ClientError

    from deploy.aws.session import describe

    args = build_parser().parse_args(argv)
    settings = settings_mod.from_args(args)
    if args.command == "status":
        experiment = experiment_of(args.config) if args.config else None
    else:
        sweep, config_path = load_config(args.config)
        experiment = sweep.experiment_id
    if args.command == "terminate" and args.stop and args.cleanup:
        raise cli.UsageError("--cleanup removes the security group and role of terminated instances; "
                             "it does not go with --stop")
    try:
        clients = Clients(settings, session)
        if args.command == "launch":
            if args.dry_run:
                return dry_run(sweep, settings, clients, out)
            confirm = None
            if not args.yes and sys.stdin.isatty():
                def confirm():
                    return input("launch this fleet? [y/N] ").strip().lower() in ("y", "yes")
            return launch(sweep, config_path, args, settings, clients, out, confirm)
        if args.command == "status":
            return status(clients, experiment, out)
        if args.command == "results":
            return results(clients, experiment, args.out, out)
        return terminate(clients, experiment, args.stop, args.cleanup, out)
    except (BotoCoreError, ClientError) as exc:  # botocore errors outside a named step
        raise AwsError(describe(exc)) from None


def main(argv=None, *, out=None, session=None):
    """Entry point; ``session`` (a boto3 Session) lets tests observe or fail calls."""
    return cli.run_main(lambda a: _main(a, out or sys.stdout, session), argv, prog=PROG,
                        runtime_errors=(AwsError, OSError),
                        usage_errors=(settings_mod.SettingsError, config_mod.ConfigError, plan_mod.PlanError))
