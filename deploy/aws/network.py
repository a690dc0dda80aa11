"""Where instances go: zones, subnets, the security group, and the image.

Security group ``parm-<experiment>`` (created if missing, in the subnets'
VPC): all traffic is allowed only between members of the group; SSH (TCP
22) only with a key pair, and only from ``settings.ssh_cidr`` (one address:
the caller's /32 by default); SSH rules of earlier launches for other
addresses are revoked; no rule ever opens a port to 0.0.0.0/0 or ::/0 —
an existing group with such a rule has it revoked.

Zones: the candidates are ``settings.availability_zones`` (or every zone
of the region) that offer *all* the fleet's instance types
(``DescribeInstanceTypeOfferings``); launches try them in order, so a
capacity failure in one zone moves on to the next.

Images: ``settings.ami`` if given, else the public SSM parameter of a
current Ubuntu image, or of the deep-learning (NVIDIA driver) image for
instance types with GPUs.
"""

import ipaddress
import urllib.request
from dataclasses import dataclass

from deploy.aws.session import AwsError, aws_errors, describe

CHECKIP_URL = "https://checkip.amazonaws.com"
WORLD = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Placement:
    vpc_id: str
    subnets: tuple  # ((subnet_id, zone), ...) in the order to try


def security_group_name(experiment_id):
    return f"parm-{experiment_id}"


def instance_type_info(clients, instance_types):
    """{type: {"gpus": n, "vcpus": n}}; ``AwsError`` naming unknown types."""
    from botocore.exceptions import ClientError

    try:
        reply = clients.ec2.describe_instance_types(InstanceTypes=list(instance_types))
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "InvalidInstanceType":
            known = set()
            for itype in instance_types:
                try:
                    clients.ec2.describe_instance_types(InstanceTypes=[itype])
                    known.add(itype)
                except ClientError:
                    pass
            unknown = sorted(set(instance_types) - known)
            raise AwsError(
                f"unknown instance type(s) in region {clients.settings.region}: {', '.join(unknown)} "
                "(override with --frontend-type/--worker-type/--client-type)"
            ) from None
        with aws_errors():
            raise
    info = {}
    for t in reply["InstanceTypes"]:
        gpus = sum(g.get("Count", 0) for g in t.get("GpuInfo", {}).get("Gpus", []))
        info[t["InstanceType"]] = {"gpus": gpus, "vcpus": t.get("VCpuInfo", {}).get("DefaultVCpus", 0)}
    return info


def candidate_zones(clients, instance_types):
    """Zones (in order) offering every type; ``AwsError`` if there is none."""
    settings = clients.settings
    with aws_errors("listing availability zones: "):
        offered = None
        for itype in instance_types:
            reply = clients.ec2.describe_instance_type_offerings(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [itype]}],
            )
            zones = {o["Location"] for o in reply["InstanceTypeOfferings"]}
            offered = zones if offered is None else offered & zones
        region_zones = [z["ZoneName"] for z in clients.ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"]]
    wanted = list(settings.availability_zones) or sorted(region_zones)
    unknown = [z for z in wanted if z not in region_zones]
    if unknown:
        raise AwsError(f"availability zone(s) {', '.join(unknown)} are not in region {settings.region}")
    zones = [z for z in wanted if z in (offered or set())]
    if not zones:
        raise AwsError(
            f"no availability zone among {', '.join(wanted)} offers all of {', '.join(instance_types)}"
        )
    return zones


def placement(clients, zones):
    """The VPC and (subnet, zone) pairs to launch into, in zone order."""
    settings = clients.settings
    with aws_errors("finding subnets: "):
        if settings.subnet_ids:
            subnets = clients.ec2.describe_subnets(SubnetIds=list(settings.subnet_ids))["Subnets"]
            vpcs = {s["VpcId"] for s in subnets}
            if len(vpcs) != 1:
                raise AwsError(f"--subnet-ids span {len(vpcs)} VPCs; give subnets of one VPC")
            by_id = {s["SubnetId"]: s for s in subnets}
            ordered = [(sid, by_id[sid]["AvailabilityZone"]) for sid in settings.subnet_ids]
            usable = [(sid, z) for sid, z in ordered if z in zones]
            if not usable:
                raise AwsError("none of --subnet-ids is in a zone that offers the fleet's instance types")
            return Placement(vpcs.pop(), tuple(usable))
        vpcs = clients.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise AwsError(f"region {settings.region} has no default VPC; give --subnet-ids")
        vpc_id = vpcs[0]["VpcId"]
        subnets = clients.ec2.describe_subnets(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]},
        ])["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets}
    usable = tuple((by_zone[z], z) for z in zones if z in by_zone)
    if not usable:
        raise AwsError(f"the default VPC {vpc_id} has no subnet in {', '.join(zones)}; give --subnet-ids")
    return Placement(vpc_id, usable)


def detect_ssh_cidr(fetch=None, timeout_s=5.0):
    """The caller's public IPv4 address as a /32 (``fetch`` returns the checkip body)."""
    def default_fetch():
        with urllib.request.urlopen(CHECKIP_URL, timeout=timeout_s) as reply:
            return reply.read().decode()

    try:
        text = (fetch or default_fetch)().strip()
        address = ipaddress.IPv4Address(text)
    except (OSError, ValueError) as exc:
        raise AwsError(f"could not find your public address ({exc}); give --ssh-cidr CIDR or --ssh-cidr none") from None
    return f"{address}/32"


def resolve_ssh_cidr(settings, fetch=None):
    """The one address allowed to SSH, or None (no SSH rule: ``none``, or no key pair to log in with)."""
    if settings.ssh_cidr == "none" or not settings.key_name:
        return None
    if settings.ssh_cidr == "auto":
        return detect_ssh_cidr(fetch)
    return settings.ssh_cidr


def find_security_group(clients, experiment_id, vpc_id):
    with aws_errors("finding the security group: "):
        groups = clients.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [security_group_name(experiment_id)]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ])["SecurityGroups"]
    return groups[0] if groups else None


def delete_security_groups(clients, experiment_id):
    """Deletes the experiment's security group(s), in every VPC -> list of changes."""
    changes = []
    with aws_errors("removing the security group: "):
        groups = clients.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [security_group_name(experiment_id)]}])["SecurityGroups"]
        for group in groups:
            clients.ec2.delete_security_group(GroupId=group["GroupId"])
            changes.append(f"deleted security group {group['GroupId']}")
    return changes


def ensure_security_group(clients, experiment_id, vpc_id, ssh_cidr):
    """Creates or repairs the experiment's group -> (group id, list of changes made)."""
    changes = []
    group = find_security_group(clients, experiment_id, vpc_id)
    with aws_errors("setting up the security group: "):
        if group is None:
            group_id = clients.ec2.create_security_group(
                GroupName=security_group_name(experiment_id), VpcId=vpc_id,
                Description=f"ParM experiment {experiment_id}: traffic within the group, SSH from the operator",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                    {"Key": "parm:experiment", "Value": experiment_id}]}],
            )["GroupId"]
            changes.append(f"created security group {group_id}")
            group = clients.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        group_id = group["GroupId"]
        # Revoke anything open to the world first (a hand-edited or old group).
        for perm in group.get("IpPermissions", []):
            world4 = [r for r in perm.get("IpRanges", []) if r.get("CidrIp") in WORLD]
            world6 = [r for r in perm.get("Ipv6Ranges", []) if r.get("CidrIpv6") in WORLD]
            if world4 or world6:
                bad = {k: v for k, v in perm.items() if k in ("IpProtocol", "FromPort", "ToPort")}
                if world4:
                    bad["IpRanges"] = [{"CidrIp": r["CidrIp"]} for r in world4]
                if world6:
                    bad["Ipv6Ranges"] = [{"CidrIpv6": r["CidrIpv6"]} for r in world6]
                clients.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[bad])
                changes.append(f"revoked a rule open to the internet ({perm.get('IpProtocol')} "
                               f"{perm.get('FromPort', '')}-{perm.get('ToPort', '')})")
        # SSH rules for any other address (an earlier launch from elsewhere) go.
        for perm in group.get("IpPermissions", []):
            if perm.get("IpProtocol") != "tcp" or not perm.get("FromPort", -1) <= 22 <= perm.get("ToPort", -1):
                continue
            stale4 = [r for r in perm.get("IpRanges", []) if r.get("CidrIp") != ssh_cidr and r.get("CidrIp") not in WORLD]
            stale6 = [r for r in perm.get("Ipv6Ranges", []) if r.get("CidrIpv6") != ssh_cidr
                      and r.get("CidrIpv6") not in WORLD]
            if stale4 or stale6:
                old = {k: v for k, v in perm.items() if k in ("IpProtocol", "FromPort", "ToPort")}
                if stale4:
                    old["IpRanges"] = [{"CidrIp": r["CidrIp"]} for r in stale4]
                if stale6:
                    old["Ipv6Ranges"] = [{"CidrIpv6": r["CidrIpv6"]} for r in stale6]
                clients.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[old])
                gone = [r["CidrIp"] for r in stale4] + [r["CidrIpv6"] for r in stale6]
                changes.append(f"revoked stale SSH access from {', '.join(gone)}")
        wanted = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]}]
        if ssh_cidr and ":" in ssh_cidr:
            wanted.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                           "Ipv6Ranges": [{"CidrIpv6": ssh_cidr, "Description": "SSH from the operator"}]})
        elif ssh_cidr:
            wanted.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                           "IpRanges": [{"CidrIp": ssh_cidr, "Description": "SSH from the operator"}]})
        for perm in wanted:
            if not _has_rule(group, perm):
                clients.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[perm])
                changes.append("allowed " + ("all traffic within the group" if perm["IpProtocol"] == "-1"
                                             else f"SSH from {ssh_cidr}"))
    return group_id, changes


def _has_rule(group, perm):
    for have in group.get("IpPermissions", []):
        if have.get("IpProtocol") != perm["IpProtocol"]:
            continue
        if perm["IpProtocol"] == "-1":
            if any(p.get("GroupId") == perm["UserIdGroupPairs"][0]["GroupId"]
                   for p in have.get("UserIdGroupPairs", [])):
                return True
        elif have.get("FromPort") == perm["FromPort"] and have.get("ToPort") == perm["ToPort"]:
            if "IpRanges" in perm and any(r.get("CidrIp") == perm["IpRanges"][0]["CidrIp"]
                                          for r in have.get("IpRanges", [])):
                return True
            if "Ipv6Ranges" in perm and any(r.get("CidrIpv6") == perm["Ipv6Ranges"][0]["CidrIpv6"]
                                            for r in have.get("Ipv6Ranges", [])):
                return True
    return False


def check_key_pair(clients):
    """``AwsError`` if ``settings.key_name`` is given but not in the region."""
    from botocore.exceptions import ClientError

    name = clients.settings.key_name
    if not name:
        return
    try:
        clients.ec2.describe_key_pairs(KeyNames=[name])
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "InvalidKeyPair.NotFound":
            raise AwsError(f"key pair {name!r} is not in region {clients.settings.region}; "
                           "create or import it, or leave out --key-name") from None
        with aws_errors("checking the key pair: "):
            raise


def resolve_ami(clients, gpu):
    """The image id for a role: ``settings.ami`` or the SSM parameter's current value."""
    settings = clients.settings
    if settings.ami:
        return settings.ami
    name = settings.ami_parameter_gpu if gpu else settings.ami_parameter_cpu
    from botocore.exceptions import ClientError

    try:
        return clients.ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ParameterNotFound":
            raise AwsError(f"SSM parameter {name} (the default {'GPU' if gpu else 'CPU'} image) is not in "
                           f"region {settings.region}; give --ami or --ami-ssm-{'gpu' if gpu else 'cpu'}") from None
        with aws_errors("looking up the image: "):
            raise


def root_device(clients, ami):
    """(root device name, size in GB of the image's root snapshot, or 0 when unknown) of ``ami``."""
    with aws_errors(f"describing image {ami}: "):
        images = clients.ec2.describe_images(ImageIds=[ami])["Images"]
    if not images:
        raise AwsError(f"image {ami} not found in region {clients.settings.region}")
    image = images[0]
    name = image.get("RootDeviceName", "/dev/sda1")
    size = next((m.get("Ebs", {}).get("VolumeSize", 0) for m in image.get("BlockDeviceMappings", [])
                 if m.get("DeviceName") == name), 0)
    return name, int(size or 0)


def root_volume_gb(clients, ami):
    """The root volume to ask for: the larger of the setting and the image's snapshot (RunInstances
    rejects a smaller one with ``InvalidBlockDeviceMapping``)."""
    return max(clients.settings.volume_size_gb, root_device(clients, ami)[1])


# Service Quotas codes of the EC2 vCPU limits, by instance family letter(s).
VCPU_QUOTAS = {
    "standard": ("L-1216C47A", "L-34B43A08", "Standard (A, C, D, H, I, M, R, T, Z)"),
    "g": ("L-DB2E81BA", "L-3819A6DF", "G and VT"),
    "p": ("L-417A185B", "L-7212CCBC", "P"),
    "f": ("L-74FC7D96", "L-88CF9481", "F"),
    "inf": ("L-1945791B", "L-B5D1601B", "Inf"),
    "x": ("L-7295265B", "L-E3A00192", "X"),
}


def quota_group(instance_type):
    family = instance_type.split(".")[0].lower()
    for prefix in ("inf", "vt", "g", "p", "f", "x"):
        if family.startswith(prefix):
            return "g" if prefix == "vt" else prefix
    return "standard"


def vcpu_quota_notes(clients, plan, info):
    """Notes on the vCPU quota of each family the fleet uses (needed vs the account's quota)."""
    from botocore.exceptions import BotoCoreError, ClientError

    need = {}
    for g in plan.groups:
        group = quota_group(g.instance_type)
        need[group] = need.get(group, 0) + g.count * info.get(g.instance_type, {}).get("vcpus", 0)
    notes = []
    for group, vcpus in sorted(need.items()):
        on_demand, spot, label = VCPU_QUOTAS[group]
        code = spot if clients.settings.spot else on_demand
        try:
            value = clients.service_quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
        except (ClientError, BotoCoreError) as exc:
            notes.append(f"vCPU quota of {label} instances ({code}) not checked: {describe(exc)}")
            continue
        verdict = "OK" if vcpus <= value else "TOO LOW: ask for an increase before launching"
        notes.append(f"vCPU quota of {clients.settings.market} {label} instances: the fleet needs {vcpus}, "
                     f"the quota is {value:.0f} (running instances count against it too): {verdict}")
    return notes


def regions_with_instances(clients, experiment_id):
    """Regions (other than the current one) holding live instances of ``experiment_id``."""
    from botocore.exceptions import BotoCoreError, ClientError

    from concurrent.futures import ThreadPoolExecutor

    with aws_errors("listing regions: "):
        regions = sorted(r["RegionName"] for r in clients.ec2.describe_regions()["Regions"]
                         if r["RegionName"] != clients.settings.region)

    # Clients are made here, in this thread (a boto3 session is not thread-safe; clients are).
    ec2s = {r: clients.session.client("ec2", region_name=r, endpoint_url=clients.settings.endpoint_url)
            for r in regions}

    def count(region):
        try:
            reply = ec2s[region].describe_instances(Filters=[
                {"Name": "tag:parm:experiment", "Values": [experiment_id]},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
        except (ClientError, BotoCoreError):
            return 0  # a region not enabled for the account
        return sum(len(r["Instances"]) for r in reply["Reservations"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(count, regions))
    return [(region, n) for region, n in zip(regions, counts) if n]
