"""Finding, reusing, launching, tagging, stopping and terminating the fleet.

Every instance carries the tags ``parm:experiment``, ``parm:role``
(frontend/worker/client), ``parm:managed-by`` and ``Name``. A launch reuses
instances of the experiment with the right role *and* type that are
pending, running, stopping or stopped (stopped ones are started), and
launches only the rest. Instances of the right role but another type are
not reused (the plan lists them).

A role's missing instances are launched in one ``RunInstances`` call
(MinCount = MaxCount: all or none), in the first zone with capacity; the
zone of instances already in the fleet is tried first, so the fleet stays
in one zone when it can. Capacity errors move on to the next zone; a quota
or any other error stops the launch with ``LaunchFailed``: the instances
this launch created are terminated (unless ``keep_partial``), and the
message names the region and what is still running.

Root volumes are encrypted gp3, as large as the setting or the image's
root snapshot, whichever is larger.
"""

import time
from dataclasses import dataclass

from deploy.aws.network import root_device
from deploy.aws.session import CAPACITY_CODES, QUOTA_CODES, AwsError, aws_errors, describe, error_code

TAG_EXPERIMENT = "parm:experiment"
TAG_ROLE = "parm:role"
TAG_MANAGED = "parm:managed-by"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
LAUNCH_ORDER = ("worker", "client", "frontend")  # largest first: a quota failure costs least
PROFILE_RETRIES = 6
PROFILE_RETRY_S = 5.0


class LaunchFailed(AwsError):
    """A launch stopped part-way; ``launched`` lists the instance ids it had launched."""

    def __init__(self, message, launched):
        super().__init__(message)
        self.launched = list(launched)


def tag(instance, name, default=""):
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == name), default)


def list_instances(clients, experiment_id=None, states=LIVE_STATES + ("shutting-down",)):
    """Instances tagged by this project (optionally of one experiment), in ``states``."""
    filters = [{"Name": "instance-state-name", "Values": list(states)}]
    if experiment_id:
        filters.append({"Name": f"tag:{TAG_EXPERIMENT}", "Values": [experiment_id]})
    else:
        filters.append({"Name": "tag-key", "Values": [TAG_EXPERIMENT]})
    out = []
    with aws_errors("listing instances: "):
        for page in clients.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                out.extend(reservation["Instances"])
    return sorted(out, key=lambda i: (tag(i, TAG_EXPERIMENT), tag(i, TAG_ROLE), i["LaunchTime"], i["InstanceId"]))


@dataclass
class ReusePlan:
    reuse: dict       # role -> [instance], at most the group's count
    skipped: list     # (instance, reason) of the experiment's instances not reused


def select_reuse(instances, plan):
    """Which of the experiment's live instances serve the plan."""
    reuse = {g.role: [] for g in plan.groups}
    skipped = []
    live = [i for i in instances if i["State"]["Name"] in LIVE_STATES]
    # Running ones first: they need no start.
    live.sort(key=lambda i: (i["State"]["Name"] != "running", i["LaunchTime"], i["InstanceId"]))
    for inst in live:
        role = tag(inst, TAG_ROLE)
        if role not in reuse:
            skipped.append((inst, f"unknown role {role!r}"))
            continue
        group = plan.group(role)
        if inst["InstanceType"] != group.instance_type:
            skipped.append((inst, f"is {inst['InstanceType']}, the plan wants {group.instance_type}"))
        elif len(reuse[role]) >= group.count:
            skipped.append((inst, f"not needed (the plan wants {group.count} {role}s)"))
        else:
            reuse[role].append(inst)
    return ReusePlan(reuse, skipped)


def launch_group(clients, *, experiment_id, role, instance_type, count, ami, user_data, security_group_id,
                 instance_profile, subnets, preferred_zone=None):
    """Launches ``count`` instances of one role -> their descriptions."""
    from botocore.exceptions import ClientError

    settings = clients.settings
    ordered = sorted(subnets, key=lambda s: s[1] != preferred_zone)
    device, snapshot_gb = root_device(clients, ami)
    tags = [{"Key": "Name", "Value": f"parm-{experiment_id}-{role}"},
            {"Key": TAG_EXPERIMENT, "Value": experiment_id},
            {"Key": TAG_ROLE, "Value": role},
            {"Key": TAG_MANAGED, "Value": "deploy.aws"}]
    params = dict(
        ImageId=ami, InstanceType=instance_type, MinCount=count, MaxCount=count,
        SecurityGroupIds=[security_group_id], IamInstanceProfile={"Name": instance_profile},
        UserData=user_data, MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        BlockDeviceMappings=[{"DeviceName": device, "Ebs": {
            "VolumeSize": max(settings.volume_size_gb, snapshot_gb), "VolumeType": "gp3",
            "DeleteOnTermination": True, "Encrypted": True}}],
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
    )
    if settings.key_name:
        params["KeyName"] = settings.key_name
    if settings.spot:
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    capacity = []
    for subnet_id, zone in ordered:
        for attempt in range(PROFILE_RETRIES + 1):
            try:
                return clients.ec2.run_instances(SubnetId=subnet_id, **params)["Instances"]
            except ClientError as exc:
                if error_code(exc) in CAPACITY_CODES:
                    capacity.append(f"{zone}: {describe(exc)}")
                    break
                # A just-created instance profile takes a few seconds to be usable.
                if (error_code(exc) == "InvalidParameterValue" and "profile" in describe(exc).lower()
                        and attempt < PROFILE_RETRIES):
                    time.sleep(PROFILE_RETRY_S)
                    continue
                raise
    raise AwsError(f"no capacity for {count} x {instance_type} ({settings.market}) in any zone: "
                   + "; ".join(capacity))


def launch_fleet(clients, plan, reuse, *, amis, user_data, security_group_id, instance_profile, subnets,
                 keep_partial=False, before_start=None):
    """Starts stopped reused instances and launches the rest -> {role: [instance ids]}.

    ``amis`` and ``user_data`` map role -> value. ``before_start(ids)`` is
    called with the stopped instances right before they are started (the
    launcher deletes their old ready reports there). Raises ``LaunchFailed``
    if any step fails, after terminating what this call launched unless
    ``keep_partial``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    fleet = {role: [i["InstanceId"] for i in reuse.reuse[role]] for role in reuse.reuse}
    launched = []
    zones = [i["Placement"]["AvailabilityZone"] for insts in reuse.reuse.values() for i in insts]
    preferred = zones[0] if zones else None
    try:
        stopped = [i["InstanceId"] for insts in reuse.reuse.values() for i in insts
                   if i["State"]["Name"] in ("stopped", "stopping")]
        if stopped:
            clients.ec2.get_waiter("instance_stopped").wait(InstanceIds=stopped)
            if before_start is not None:
                before_start(stopped)
            clients.ec2.start_instances(InstanceIds=stopped)
        for role in LAUNCH_ORDER:
            group = plan.group(role)
            missing = group.count - len(fleet[role])
            if missing <= 0:
                continue
            new = launch_group(
                clients, experiment_id=plan.experiment_id, role=role, instance_type=group.instance_type,
                count=missing, ami=amis[role], user_data=user_data[role], security_group_id=security_group_id,
                instance_profile=instance_profile, subnets=subnets, preferred_zone=preferred,
            )
            ids = [i["InstanceId"] for i in new]
            launched.extend(ids)
            fleet[role].extend(ids)
            preferred = preferred or new[0]["Placement"]["AvailabilityZone"]
    except (AwsError, ClientError, BotoCoreError) as exc:
        reason = str(exc) if isinstance(exc, AwsError) else describe(exc)
        code = error_code(exc)
        if code in QUOTA_CODES:
            reason = f"quota: {reason} (ask for a limit increase, or a smaller fleet)"
        region = clients.settings.region
        cleanup = ""
        if launched and not keep_partial:
            try:
                clients.ec2.terminate_instances(InstanceIds=launched)
                cleanup = f" Terminated what this launch created: {', '.join(launched)}."
            except (ClientError, BotoCoreError) as term_exc:
                cleanup = f" Could NOT terminate {', '.join(launched)}: {describe(term_exc)}."
        elif launched:
            cleanup = f" Kept (--keep-partial): {', '.join(launched)}."
        running = [i for ids in fleet.values() for i in ids if i not in launched or keep_partial or "NOT" in cleanup]
        still = ", ".join(running) if running else "none"
        raise LaunchFailed(
            f"launch of {plan.experiment_id} in {region} stopped: {reason}.{cleanup} Still in {region}: {still}"
            f"{' (remove with `python -m deploy.aws terminate CONFIG --region ' + region + '`)' if running else ''}.",
            launched,
        ) from None
    return fleet


def wait_running(clients, instance_ids, *, delay_s=5, max_attempts=120):
    """Waits until every instance runs -> their descriptions (with private IPs)."""
    with aws_errors("waiting for the instances to run: "):
        waiter = clients.ec2.get_waiter("instance_running")
        waiter.wait(InstanceIds=list(instance_ids), WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts})
        out = []
        for page in clients.ec2.get_paginator("describe_instances").paginate(InstanceIds=list(instance_ids)):
            for reservation in page["Reservations"]:
                out.extend(reservation["Instances"])
    return out


def terminate(clients, experiment_id, *, stop=False):
    """Terminates (or stops) the experiment's instances -> list of (id, previous, current state)."""
    instances = [i for i in list_instances(clients, experiment_id) if i["State"]["Name"] != "shutting-down"]
    if stop:
        instances = [i for i in instances if i["State"]["Name"] not in ("stopped", "stopping")]
        spot = [i["InstanceId"] for i in instances if i.get("InstanceLifecycle") == "spot"]
        if spot:
            raise AwsError(f"spot instances cannot be stopped: {', '.join(spot)}; terminate them instead "
                           "(nothing was changed)")
    ids = [i["InstanceId"] for i in instances]
    if not ids:
        return []
    with aws_errors("stopping instances: " if stop else "terminating instances: "):
        if stop:
            changes = clients.ec2.stop_instances(InstanceIds=ids)["StoppingInstances"]
        else:
            changes = clients.ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
    return [(c["InstanceId"], c["PreviousState"]["Name"], c["CurrentState"]["Name"]) for c in changes]
