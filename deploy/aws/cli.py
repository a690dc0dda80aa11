"""``python -m deploy.aws launch|status|results|terminate`` (see docs/aws.md).

- ``launch CONFIG [--dry-run] [--yes]``: plan the fleet, upload the release
  and artifacts, set up bucket, IAM profile and security group, reuse or
  launch instances, write ``fleet.json`` and a sweep request that the
  frontend node's runner picks up. ``--dry-run`` prints the plan (instances
  by role and type, what is reused, estimated cost) and calls only
  read-only APIs (or none, without credentials).
- ``status [CONFIG]``: the project's instances (of one experiment), their
  ready reports and the sweep's state.
- ``results CONFIG``: downloads the latest sweep's results and prints them.
- ``terminate CONFIG [--stop]``: terminates (or stops) the experiment's
  instances.

Every mistake or AWS failure is one line on stderr and a non-zero exit:
2 for usage and config errors, 1 for AWS errors.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from deploy.runner import config as config_mod
from deploy.aws import iam, instances, network, plan as plan_mod, settings as settings_mod, storage, userdata
from deploy.aws.session import AwsError, Clients

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class UsageError(ValueError):
    """A command-line mistake (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="python -m deploy.aws", description="Run a ParM sweep on EC2 instances.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    launch = sub.add_parser("launch", help="launch or reuse the fleet and start the sweep",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    launch.add_argument("config", help="sweep config, e.g. configs/fig9a.json (or its name: fig9a)")
    launch.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    launch.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    launch.add_argument("--wheel", default=None, help="prebuilt project wheel (default: build one)")
    launch.add_argument("--source-archive", default=None,
                        help="source .tar.gz for nodes the wheel does not fit (default: git archive HEAD)")
    launch.add_argument("--artifacts", default="artifacts", help="artifacts directory to upload")
    launch.add_argument("--no-run", action="store_true", help="launch only; do not request a sweep")
    settings_mod.add_arguments(launch)

    status = sub.add_parser("status", help="list the fleet(s)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    status.add_argument("config", nargs="?", default=None, help="only this experiment's instances")
    settings_mod.add_arguments(status)

    results = sub.add_parser("results", help="download and print the sweep's results",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    results.add_argument("config")
    results.add_argument("--out", default="results/aws", help="download into OUT/EXPERIMENT/REQUEST_ID")
    settings_mod.add_arguments(results)

    term = sub.add_parser("terminate", help="terminate (or stop) the experiment's instances",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    term.add_argument("config")
    term.add_argument("--stop", action="store_true", help="stop instead of terminating (on-demand only)")
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


# -- launch ------------------------------------------------------------------------------------

def dry_run(sweep, settings, clients, out):
    """Prints the plan using read-only calls only (none without credentials)."""
    fleet_plan = plan_mod.plan_fleet(sweep, settings)
    notes = _type_notes(fleet_plan, settings)
    try:
        clients.account_id()
    except AwsError as exc:
        notes.append(f"reuse, zones and images not checked: {exc}")
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
    for role in plan_mod.ROLES:
        gpu = info[fleet_plan.group(role).instance_type]["gpus"] > 0
        try:
            notes.append(f"{role} image: {network.resolve_ami(clients, gpu)}")
        except AwsError as exc:
            notes.append(f"{role} image: {exc}")
    existing = instances.list_instances(clients, sweep.experiment_id)
    reuse = instances.select_reuse(existing, fleet_plan)
    notes.extend(f"not reused: {i['InstanceId']} ({i['State']['Name']}) {why}" for i, why in reuse.skipped)
    notes.append(f"bucket: {_bucket(clients)}, security group: {network.security_group_name(sweep.experiment_id)}"
                 f", SSH from: {settings.ssh_cidr}")
    print(plan_mod.format_plan(fleet_plan, settings, reuse=reuse.reuse, notes=notes), file=out)
    return 0


def _type_notes(fleet_plan, settings):
    notes = []
    for g in fleet_plan.groups:
        if g.instance_type.split(".")[0] in ("p2", "p3") and not settings.ami:
            notes.append(f"{g.role} type {g.instance_type}: current deep-learning images no longer support "
                         f"its GPU; use --{g.role}-type g4dn.xlarge (or give --ami)")
    return notes


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


def launch(sweep, config_path, args, settings, clients, out, confirm=None):
    """The real launch (see the module doc) -> exit code."""
    fleet_plan = plan_mod.plan_fleet(sweep, settings)
    exp = sweep.experiment_id
    bucket = _bucket(clients)
    info = network.instance_type_info(clients, fleet_plan.instance_types)
    network.check_key_pair(clients)
    zones = network.candidate_zones(clients, fleet_plan.instance_types)
    place = network.placement(clients, zones)
    gpu = {g.role: info[g.instance_type]["gpus"] > 0 for g in fleet_plan.groups}
    amis = {role: network.resolve_ami(clients, gpu[role]) for role in plan_mod.ROLES}
    ssh_cidr = network.resolve_ssh_cidr(settings)
    reuse = instances.select_reuse(instances.list_instances(clients, exp), fleet_plan)
    notes = _type_notes(fleet_plan, settings)
    notes.extend(f"not reused: {i['InstanceId']} ({i['State']['Name']}) {why}" for i, why in reuse.skipped)
    print(plan_mod.format_plan(fleet_plan, settings, reuse=reuse.reuse, notes=notes), file=out)
    if confirm is not None and not confirm():
        print("not launched", file=out)
        return 1

    def step(message):
        print(message, file=out, flush=True)

    for change in storage.ensure_bucket(clients, bucket):
        step(change)
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
    group_id, changes = network.ensure_security_group(clients, exp, place.vpc_id, ssh_cidr)
    for change in changes:
        step(change)
    user_data = {role: userdata.render_user_data(role, experiment_id=exp, bucket=bucket, region=settings.region,
                                                 agent_port=settings.agent_port, gpu=gpu[role])
                 for role in plan_mod.ROLES}
    fleet = instances.launch_fleet(clients, fleet_plan, reuse, amis=amis, user_data=user_data,
                                   security_group_id=group_id, instance_profile=profile, subnets=place.subnets)
    all_ids = [i for ids in fleet.values() for i in ids]
    described = {i["InstanceId"]: i for i in instances.wait_running(clients, all_ids)}
    roles = {role: [described[i].get("PrivateIpAddress", "") for i in ids] for role, ids in fleet.items()}
    storage.put_json(clients, bucket, storage.key(exp, "fleet.json"), {
        "experiment_id": exp, "agent_port": settings.agent_port, "roles": roles, "instances": fleet,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    for role in plan_mod.ROLES:
        step(f"{role}: {', '.join(fleet[role])}")
    if not args.no_run:
        request_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        storage.put_json(clients, bucket, storage.key(exp, "control", "request.json"), {
            "id": request_id, "config": json.loads(pathlib.Path(config_path).read_text()),
            "command": settings.runner_command,
        })
        step(f"requested sweep {request_id}; the frontend node runs it once its fleet is up")
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
    ready = {}
    for exp in sorted({instances.tag(i, instances.TAG_EXPERIMENT) for i in found}):
        if have_bucket:
            for k in storage.list_keys(clients, bucket, storage.key(exp, "ready") + "/"):
                report = storage.get_json(clients, bucket, k) or {}
                ready[report.get("instance_id")] = report.get("state", "?")
    print(f"{'EXPERIMENT':<14} {'ROLE':<9} {'INSTANCE':<20} {'TYPE':<13} {'STATE':<13} {'MARKET':<9} "
          f"{'ZONE':<12} {'PRIVATE IP':<15} {'PUBLIC IP':<15} BOOT", file=out)
    for i in found:
        print(f"{instances.tag(i, instances.TAG_EXPERIMENT):<14} {instances.tag(i, instances.TAG_ROLE):<9} "
              f"{i['InstanceId']:<20} {i['InstanceType']:<13} {i['State']['Name']:<13} "
              f"{i.get('InstanceLifecycle', 'on-demand'):<9} {i['Placement']['AvailabilityZone']:<12} "
              f"{i.get('PrivateIpAddress', '-'):<15} {i.get('PublicIpAddress', '-'):<15} "
              f"{ready.get(i['InstanceId'], 'booting')}", file=out)
    if experiment_id and have_bucket:
        sweep = storage.get_json(clients, bucket, storage.key(experiment_id, "control", "status.json"))
        if sweep:
            print(f"sweep {sweep.get('id')}: {sweep.get('state')} at {sweep.get('time')}", file=out)
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


def terminate(clients, experiment_id, stop, out):
    changed = instances.terminate(clients, experiment_id, stop=stop)
    if not changed:
        print(f"no instances of experiment {experiment_id} to {'stop' if stop else 'terminate'}", file=out)
    for instance_id, before, after in changed:
        print(f"{instance_id}: {before} -> {after}", file=out)
    return 0


# -- entry point ---------------------------------------------------------------------------------

def main(argv=None, *, out=None, err=None, session=None):
    """Entry point; ``session`` (a boto3 Session) lets tests observe or fail calls."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        settings = settings_mod.from_args(args)
        if args.command == "status":
            experiment = experiment_of(args.config) if args.config else None
        else:
            sweep, config_path = load_config(args.config)
            experiment = sweep.experiment_id
    except (UsageError, settings_mod.SettingsError, config_mod.ConfigError) as exc:
        print(f"deploy.aws: {exc}", file=err)
        return 2
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
        return terminate(clients, experiment, args.stop, out)
    except plan_mod.PlanError as exc:
        print(f"deploy.aws: {exc}", file=err)
        return 2
    except AwsError as exc:
        print(f"deploy.aws: {exc}", file=err)
        return 1
    except Exception as exc:  # noqa: BLE001 - botocore errors outside a named step
        from botocore.exceptions import BotoCoreError, ClientError

        from deploy.aws.session import describe

        if not isinstance(exc, (BotoCoreError, ClientError)):
            raise
        print(f"deploy.aws: {describe(exc)}", file=err)
        return 1
    except KeyboardInterrupt:
        print("deploy.aws: interrupted", file=err)
        return 130
