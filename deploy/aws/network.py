"""Where instances go: zones, subnets, the security group, and the image.

Security group ``parm-<experiment>`` (created if missing, in the subnets'
VPC): all traffic is allowed only between members of the group; SSH (TCP
22) only from ``settings.ssh_cidr`` (the caller's address /32 by default);
no rule ever opens a port to 0.0.0.0/0 or ::/0 — an existing group with
such a rule has it revoked.

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

from deploy.aws.session import AwsError, aws_errors

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
    if settings.ssh_cidr == "none":
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
        wanted = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]}]
        if ssh_cidr:
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
            if any(r.get("CidrIp") == perm["IpRanges"][0]["CidrIp"] for r in have.get("IpRanges", [])):
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
