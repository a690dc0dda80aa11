"""``python -m deploy.aws`` end to end against a moto server (EC2, S3, SSM, IAM, STS).

Nothing here reaches AWS: see conftest.py.
"""

import base64
import contextlib
import io
import json
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from deploy.aws import cli
from deploy.aws.instances import TAG_EXPERIMENT, TAG_ROLE, tag
from tests.aws.conftest import read_json_object

READ_ONLY_PREFIXES = ("Describe", "Get", "List", "Head")


@pytest.fixture
def release(tmp_path):
    wheel = tmp_path / "parm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    source = tmp_path / "parm-src.tar.gz"
    source.write_bytes(b"not really a tarball")
    artifacts = tmp_path / "artifacts"
    (artifacts / "mnist").mkdir(parents=True)
    (artifacts / "mnist" / "base.onnx").write_bytes(b"\x01" * 1000)
    (artifacts / "mnist" / "base.json").write_text('{"name": "base"}')
    return ["--wheel", str(wheel), "--source-archive", str(source), "--artifacts", str(artifacts)]


ERR = "python -m deploy.aws: error: "


def run(argv, session=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv, out=out, session=session)
    return rc, out.getvalue(), err.getvalue()


def fleet(aws, experiment="simple", states=("pending", "running", "stopping", "stopped")):
    ec2 = aws["client"]("ec2")
    found = []
    for r in ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_EXPERIMENT}", "Values": [experiment]},
                                             {"Name": "instance-state-name", "Values": list(states)}])["Reservations"]:
        found.extend(r["Instances"])
    return found


def by_role(instances):
    out = {}
    for i in instances:
        out.setdefault(tag(i, TAG_ROLE), []).append(i)
    return out


LAUNCH = ["launch", "simple", "--worker-type", "g4dn.xlarge", "--yes"]


def test_launch_tags_secures_uploads_and_requests_the_sweep(aws, release):
    rc, out, err = run(LAUNCH + release)
    assert rc == 0, err
    roles = by_role(fleet(aws))
    assert {r: len(v) for r, v in roles.items()} == {"frontend": 1, "worker": 3, "client": 1}
    assert {i["InstanceType"] for i in roles["worker"]} == {"g4dn.xlarge"}
    assert roles["frontend"][0]["InstanceType"] == "c5.9xlarge"
    assert roles["client"][0]["InstanceType"] == "m5.xlarge"
    # Images: the GPU parameter for GPU workers, the CPU one elsewhere.
    assert {i["ImageId"] for i in roles["worker"]} == {aws["gpu_ami"]}
    assert roles["frontend"][0]["ImageId"] == aws["ubuntu_ami"]
    ec2 = aws["client"]("ec2")
    for role, insts in roles.items():
        inst = insts[0]
        assert tag(inst, "Name") == f"parm-simple-{role}"
        assert tag(inst, "parm:managed-by") == "deploy.aws"
        assert inst["IamInstanceProfile"]["Arn"].endswith("instance-profile/parm-simple-node")
        assert inst.get("InstanceLifecycle", "on-demand") == "on-demand"
        user_data = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
        script = base64.b64decode(user_data["UserData"]["Value"]).decode()
        assert f"ROLE={role}\n" in script
        assert ("EXTRAS=gpu" in script) == (role == "worker")
        assert f"BUCKET_OWNER={aws['account']}" in script
        assert ("deploy.aws.node runner" in script) == (role == "frontend")
    # One zone for the whole fleet.
    assert len({i["Placement"]["AvailabilityZone"] for v in roles.values() for i in v}) == 1

    # Security group: all traffic within the group; no key pair, so no SSH rule; nothing from the world.
    groups = {g["GroupId"] for i in fleet(aws) for g in i["SecurityGroups"]}
    assert len(groups) == 1
    group = ec2.describe_security_groups(GroupIds=list(groups))["SecurityGroups"][0]
    assert group["GroupName"] == "parm-simple"
    perms = group["IpPermissions"]
    assert len(perms) == 1
    within = next(p for p in perms if p["IpProtocol"] == "-1")
    assert [p["GroupId"] for p in within["UserIdGroupPairs"]] == [group["GroupId"]]
    assert within.get("IpRanges", []) == []

    # IAM: the nodes may read the experiment's prefix only.
    iam = aws["client"]("iam")
    import json
    policy = iam.get_role_policy(RoleName="parm-simple-node", PolicyName="parm-experiment-bucket")["PolicyDocument"]
    policy = policy if isinstance(policy, dict) else json.loads(policy)
    bucket = f"parm-{aws['account']}-us-east-1"
    resources = [r for s in policy["Statement"] for r in s["Resource"]]
    assert f"arn:aws:s3:::{bucket}/simple/*" in resources
    assert all(r.startswith((f"arn:aws:s3:::{bucket}", "arn:aws:ec2:us-east-1:")) for r in resources)

    # S3: release, artifacts, config, fleet and the sweep request.
    s3 = aws["client"]("s3")
    assert read_json_object(s3, bucket, "simple/dist/release.json") == {
        "wheel": "simple/dist/parm-0.1.0-py3-none-any.whl", "source": "simple/dist/parm-src.tar.gz"}
    assert s3.get_object(Bucket=bucket, Key="simple/artifacts/mnist/base.onnx")["Body"].read() == b"\x01" * 1000
    fleet_json = read_json_object(s3, bucket, "simple/fleet.json")
    assert fleet_json["agent_port"] == 7070
    assert sorted(fleet_json["roles"]["worker"]) == sorted(i["PrivateIpAddress"] for i in roles["worker"])
    assert fleet_json["roles"]["frontend"] == [roles["frontend"][0]["PrivateIpAddress"]]
    request = read_json_object(s3, bucket, "simple/control/request.json")
    assert request["config"]["experiment_id"] == "simple"
    assert "-m deploy.runner.local {config} --agents {hosts}" in request["command"]
    assert "requested sweep" in out
    assert request["keep_running"] is False
    assert "the fleet stops itself once the sweep's results are uploaded" in out
    public = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert public["BlockPublicAcls"] and public["RestrictPublicBuckets"]
    # Bucket policy: TLS only; the TLS keys readable by the node role only.
    # (The deny-without-TLS statement is left out for moto's plain-http endpoint, which enforces policies:
    # test_bucket_policy_denies_plain_http covers it.)
    statements = {st["Sid"]: st for st in json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]}
    assert "NOT TLS-only (plain-http endpoint override)" in out
    keys = statements["ParmTlsKeysNodeRoleOnlySimple"]
    assert keys["Resource"] == [f"arn:aws:s3:::{bucket}/simple/tls/*"] and keys["Effect"] == "Deny"
    assert keys["Condition"] == {"ArnNotEquals": {
        "aws:PrincipalArn": f"arn:aws:iam::{aws['account']}:role/parm-simple-node"}}
    tls = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="simple/tls/")["Contents"])
    assert tls == ["simple/tls/ca.pem", "simple/tls/node.key", "simple/tls/node.pem"]
    # moto enforces the bucket policy: the launching user itself cannot read the node key back.
    with pytest.raises(ClientError) as denied:
        s3.get_object(Bucket=bucket, Key="simple/tls/node.key")
    assert denied.value.response["Error"]["Code"] in ("403", "AccessDenied")
    # Root volumes: encrypted gp3.
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                             "Values": [i["InstanceId"] for i in fleet(aws)]}])["Volumes"]
    assert len(volumes) == 5 and all(v["Encrypted"] and v["VolumeType"] == "gp3" for v in volumes)


def test_relaunch_reuses_running_and_stopped_instances(aws, release):
    assert run(LAUNCH + release)[0] == 0
    first = {i["InstanceId"] for i in fleet(aws)}
    ec2 = aws["client"]("ec2")
    worker = by_role(fleet(aws))["worker"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[worker])
    # An instance of the right role but another type is not reused.
    image = aws["ubuntu_ami"]
    odd = ec2.run_instances(ImageId=image, InstanceType="c5.xlarge", MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": TAG_EXPERIMENT, "Value": "simple"},
                                              {"Key": TAG_ROLE, "Value": "worker"}]}])["Instances"][0]["InstanceId"]
    rc, out, err = run(["launch", "simple", "--worker-type", "g4dn.xlarge", "--dry-run"])
    assert rc == 0, err
    assert out.splitlines()[4].split() == ["frontend", "c5.9xlarge", "1", "1", "0", "1.530"]
    assert f"  reuse worker {worker} (stopped)" in out
    assert f"not reused: {odd} (running) is c5.xlarge, the plan wants g4dn.xlarge" in out
    rc, out, err = run(LAUNCH + release)
    assert rc == 0, err
    now = {i["InstanceId"] for i in fleet(aws)}
    assert now == first | {odd}
    states = {i["InstanceId"]: i["State"]["Name"] for i in fleet(aws)}
    assert states[worker] in ("pending", "running")
    assert "LAUNCH" in out and "created" not in out  # nothing new: no bucket, group or role created


def test_dry_run_calls_only_read_only_apis(aws):
    session = aws["session"]
    calls = []
    session.events.register("before-call", lambda model, **_: calls.append(model.name))
    rc, out, err = run(["launch", "simple", "--worker-type", "g4dn.xlarge", "--dry-run"], session=session)
    assert rc == 0, err
    assert calls and all(c.startswith(READ_ONLY_PREFIXES) for c in calls), calls
    assert "GetCallerIdentity" in calls and "DescribeInstances" in calls and "GetServiceQuota" in calls
    assert fleet(aws) == []
    assert aws["client"]("s3").list_buckets()["Buckets"] == []
    lines = out.splitlines()
    assert lines[0] == "experiment simple: 2 runs, estimated sweep 0.07 h (253 s)"
    assert lines[4].split() == ["frontend", "c5.9xlarge", "1", "0", "1", "1.530"]
    assert lines[5].split() == ["worker", "g4dn.xlarge", "3", "0", "3", "0.526"]
    assert lines[6].split() == ["client", "m5.xlarge", "1", "0", "1", "0.192"]
    assert "estimated cost: 3.30 USD/h, 0.23 USD for the sweep" in out
    assert f"note: worker image: {aws['gpu_ami']}" in out
    # Item 9: zones and what a stopped fleet costs (the quota: test_dry_run_checks_the_vcpu_quota).
    assert "vCPU quota of G and VT instances (L-DB2E81BA) not checked: GetServiceQuota" in out  # moto has none
    assert "the fleet goes into one zone" in out
    assert "a stopped fleet still costs its root volumes:" in out and "GB gp3 =" in out


def test_dry_run_without_credentials_prints_the_plan(no_credentials):
    rc, out, err = run(["launch", "fig9a", "--dry-run", "--worker-type", "g4dn.xlarge"])
    assert rc == 0, err
    assert "worker    g4dn.xlarge      18     0     18      0.526" in out
    assert "reuse, zones, images and quotas not checked: checking credentials: no AWS credentials found" in out


def test_p2_worker_is_an_error_before_anything_is_created(aws):
    """Item 4: p2/p3 without --ami is an error (dry run and launch), naming the replacement."""
    for argv in (["launch", "fig9a", "--dry-run"], ["launch", "fig9a", "--yes"]):
        rc, out, err = run(argv)
        assert rc == 2
        assert err == (ERR + "worker type p2.xlarge: current deep-learning GPU images no longer drive its GPU (p2); "
                       "use --worker-type g4dn.xlarge (or give --ami with a driver for it)\n")
    assert fleet(aws, "fig9a") == []


def test_missing_credentials_is_one_line(no_credentials):
    proc = subprocess.run([sys.executable, "-m", "deploy.aws", "launch", "simple", "--yes", "--worker-type",
                           "g4dn.xlarge"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        ERR + "checking credentials: no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY), or run `aws configure`"]


def test_unknown_instance_type_is_refused_before_anything_is_created(aws):
    rc, out, err = run(["launch", "fig9a", "--yes", "--worker-type", "g9z.huge"])
    assert rc == 1
    assert err.startswith(ERR + "unknown instance type(s) in region us-east-1: g9z.huge "
                          "(override with --frontend-type/--worker-type/--client-type). no instances of fig9a in "
                          "us-east-1")
    assert fleet(aws, "fig9a") == []
    rc, out, err = run(["launch", "fig9a", "--dry-run", "--worker-type", "g9z.huge"])  # plan, then the error
    assert rc == 1 and "unknown instance type(s) in region us-east-1: g9z.huge" in err
    assert "worker    g9z.huge         18     0     18    unknown" in out


def test_missing_key_pair_is_refused_before_anything_is_created(aws, release):
    rc, out, err = run(LAUNCH + release + ["--key-name", "nobody"])
    assert rc == 1
    assert err == (ERR + "key pair 'nobody' is not in region us-east-1; create or import it, "
                   "or leave out --key-name. no instances of simple in us-east-1\n")
    assert fleet(aws) == []
    aws["client"]("ec2").create_key_pair(KeyName="me")
    rc, out, err = run(LAUNCH + release + ["--key-name", "me"])
    assert rc == 0, err
    assert {i["KeyName"] for i in fleet(aws)} == {"me"}
    # With a key pair: SSH from the one configured address only.
    ec2 = aws["client"]("ec2")
    gid = fleet(aws)[0]["SecurityGroups"][0]["GroupId"]
    perms = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]["IpPermissions"]
    ssh = next(p for p in perms if p["IpProtocol"] == "tcp")
    assert (ssh["FromPort"], ssh["ToPort"], [r["CidrIp"] for r in ssh["IpRanges"]]) == (22, 22, ["203.0.113.7/32"])
    # A launch from elsewhere revokes the earlier address's rule.
    rc, out, err = run(LAUNCH + release + ["--key-name", "me", "--ssh-cidr", "198.51.100.9/32"])
    assert rc == 0, err
    assert "revoked stale SSH access from 203.0.113.7/32" in out
    perms = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]["IpPermissions"]
    assert [r["CidrIp"] for p in perms for r in p.get("IpRanges", [])] == ["198.51.100.9/32"]


def _fail_run_instances(session, code, on_calls, message=None):
    count = {"n": 0}

    def handler(**_):
        count["n"] += 1
        if count["n"] in on_calls:
            raise ClientError({"Error": {"Code": code, "Message": message or f"injected {code}"}},
                              "RunInstances")

    session.events.register("before-call.ec2.RunInstances", handler)
    return count


def test_partial_launch_failure_terminates_what_it_launched(aws, release):
    """Item 7: workers launch, clients fail on quota: the workers are terminated, the message says so."""
    session = aws["session"]
    _fail_run_instances(session, "VcpuLimitExceeded", on_calls={2})
    rc, out, err = run(LAUNCH + release, session=session)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    workers = sorted(i["InstanceId"] for i in fleet(aws, states=("shutting-down", "terminated")))
    assert len(workers) == 3 and fleet(aws) == []
    assert "launch of simple in us-east-1 stopped: quota: RunInstances: VcpuLimitExceeded" in err
    assert "Terminated what this launch created: " + ", ".join(workers) in err.replace(", ".join(workers), ", ".join(
        workers)) or all(w in err for w in workers)
    assert "Still in us-east-1: none." in err


def test_partial_launch_failure_keep_partial(aws, release):
    session = aws["session"]
    _fail_run_instances(session, "VcpuLimitExceeded", on_calls={2})
    rc, out, err = run(LAUNCH + release + ["--keep-partial"], session=session)
    assert rc == 1
    workers = sorted(i["InstanceId"] for i in fleet(aws))
    assert len(workers) == 3
    assert "Kept (--keep-partial)" in err and "Still in us-east-1: " in err
    assert all(w in err for w in workers)
    assert "python -m deploy.aws terminate CONFIG --region us-east-1" in err


def test_capacity_failure_moves_to_the_next_zone(aws, release):
    session = aws["session"]
    _fail_run_instances(session, "InsufficientInstanceCapacity", on_calls={1})
    rc, out, err = run(LAUNCH + release + ["--availability-zones", "us-east-1b,us-east-1c"], session=session)
    assert rc == 0, err
    zones = {i["Placement"]["AvailabilityZone"] for i in fleet(aws)}
    assert zones == {"us-east-1c"}  # 1b had no capacity for the workers; the rest followed them


def test_capacity_failure_everywhere_is_reported(aws, release):
    session = aws["session"]
    _fail_run_instances(session, "InsufficientInstanceCapacity", on_calls={1, 2})
    rc, out, err = run(LAUNCH + release + ["--availability-zones", "us-east-1b,us-east-1c"], session=session)
    assert rc == 1
    assert "no capacity for 3 x g4dn.xlarge (on-demand) in any zone: us-east-1b:" in err
    assert "Still in us-east-1: none" in err
    assert fleet(aws) == []


def test_existing_group_open_to_the_world_is_repaired(aws, release):
    ec2 = aws["client"]("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    gid = ec2.create_security_group(GroupName="parm-simple", Description="old", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 1337, "ToPort": 1337, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    rc, out, err = run(LAUNCH + release)
    assert rc == 0, err
    assert "revoked a rule open to the internet (tcp 1337-1337)" in out
    perms = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]["IpPermissions"]
    cidrs = [r["CidrIp"] for p in perms for r in p.get("IpRanges", [])]
    assert "0.0.0.0/0" not in cidrs and cidrs == []


def test_spot_market_and_terminate(aws, release):
    rc, out, err = run(LAUNCH + release + ["--market", "spot", "--spot-discount", "0.5"])
    assert rc == 0, err
    assert "estimated cost: 1.65 USD/h" in out  # (1.53 + 3 * 0.526 + 0.192) / 2
    assert {i.get("InstanceLifecycle") for i in fleet(aws)} == {"spot"}
    rc, out, err = run(["terminate", "simple", "--stop"])
    assert rc == 1 and "spot instances cannot be stopped" in err and "nothing was changed" in err
    assert {i["State"]["Name"] for i in fleet(aws)} == {"running"}
    rc, out, err = run(["terminate", "simple"])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 5 and all("-> shutting-down" in line for line in out.splitlines())
    assert fleet(aws) == []
    rc, out, err = run(["terminate", "simple"])
    assert rc == 0 and out == "no instances of experiment simple in us-east-1 to terminate\n"


def test_stop_then_status(aws, release):
    assert run(LAUNCH + release)[0] == 0
    rc, out, err = run(["terminate", "simple", "--stop"])
    assert rc == 0, err
    assert {i["State"]["Name"] for i in fleet(aws)} == {"stopped"}
    rc, out, err = run(["status", "simple"])
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert sorted(r[1] for r in rows) == ["client", "frontend", "worker", "worker", "worker"]
    assert {r[4] for r in rows} == {"stopped"} and {r[-1] for r in rows} == {"booting"}


def test_usage_errors_are_one_line():
    for argv, needle in ((["launch"], "the following arguments are required: config"),
                         (["launch", "no-such-config"], "cannot read config no-such-config"),
                         (["fly"], "invalid choice: 'fly'"),
                         (["launch", "simple", "--ssh-cidr", "0.0.0.0/0"], "wider than one address"),
                         (["terminate", "simple", "--stop", "--cleanup"], "does not go with --stop")):
        proc = subprocess.run([sys.executable, "-m", "deploy.aws", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_new_instance_profile_not_yet_usable_is_retried(aws, release, monkeypatch):
    from deploy.aws import instances as instances_mod

    monkeypatch.setattr(instances_mod, "PROFILE_RETRY_S", 0.01)
    session = aws["session"]
    count = _fail_run_instances(session, "InvalidParameterValue", on_calls={1, 2},
                                message="Value (parm-simple-node) for parameter iamInstanceProfile.name is invalid. "
                                        "Invalid IAM Instance Profile name")
    rc, out, err = run(LAUNCH + release, session=session)
    assert rc == 0, err
    assert count["n"] == 2 + 3  # two refusals, then workers, clients, frontend
    assert len(fleet(aws)) == 5


def test_bucket_policy_denies_plain_http():
    from deploy.aws.storage import bucket_policy

    old = {"Version": "2012-10-17", "Statement": [{"Sid": "Theirs", "Effect": "Allow"}]}
    policy = bucket_policy("b", old, experiment_id="fig-9a", node_role_arn="arn:aws:iam::1:role/parm-fig-9a-node")
    sids = [st["Sid"] for st in policy["Statement"]]
    assert sids == ["Theirs", "DenyInsecureTransport", "ParmTlsKeysNodeRoleOnlyFig9A"]
    deny = policy["Statement"][1]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "s3:*")
    assert deny["Resource"] == ["arn:aws:s3:::b", "arn:aws:s3:::b/*"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert bucket_policy("b", policy, experiment_id="fig-9a", node_role_arn="arn:aws:iam::1:role/parm-fig-9a-node") \
        == policy  # idempotent


def _answer_quotas(session, values):
    """Service Quotas as the real service answers (moto has no EC2 quotas): ``values`` code -> vCPUs."""
    from botocore.awsrequest import AWSResponse

    def handler(model, params, **_):
        code = json.loads(params["body"])["QuotaCode"]
        return AWSResponse("https://servicequotas", 200, {}, None), {
            "Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": float(values[code])}}

    session.events.register("before-call.service-quotas.GetServiceQuota", handler)


def test_dry_run_checks_the_vcpu_quota(aws):
    session = aws["session"]
    _answer_quotas(session, {"L-DB2E81BA": 8, "L-1216C47A": 1000})
    rc, out, err = run(["launch", "simple", "--worker-type", "g4dn.xlarge", "--dry-run"], session=session)
    assert rc == 0, err
    assert ("vCPU quota of on-demand G and VT instances: the fleet needs 12, the quota is 8 (running instances "
            "count against it too): TOO LOW: ask for an increase before launching") in out
    assert ("vCPU quota of on-demand Standard (A, C, D, H, I, M, R, T, Z) instances: the fleet needs 40, "
            "the quota is 1000 (running instances count against it too): OK") in out


def _image_snapshot(session, ami, size_gb):
    """DescribeImages as the real service answers for the Deep Learning GPU image (a ~75 GB root snapshot),
    and RunInstances refusing a smaller root volume as it really does (moto models neither)."""
    def describe(parsed, **_):
        for image in parsed.get("Images", []):
            if image["ImageId"] == ami:
                image["BlockDeviceMappings"] = [{"DeviceName": image.get("RootDeviceName", "/dev/sda1"),
                                                 "Ebs": {"VolumeSize": size_gb, "SnapshotId": "snap-0dl"}}]

    def run_instances(params, **_):
        if params["ImageId"] != ami:
            return
        size = params["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        if size < size_gb:
            raise ClientError({"Error": {"Code": "InvalidBlockDeviceMapping", "Message":
                               f"Volume of size {size}GB is smaller than snapshot 'snap-0dl', expect size >= "
                               f"{size_gb}GB"}}, "RunInstances")

    session.events.register("after-call.ec2.DescribeImages", describe)
    session.events.register("before-parameter-build.ec2.RunInstances", run_instances)


def test_gpu_root_volume_is_at_least_the_image_snapshot(aws, release):
    """Item 1: the GPU image's 75 GB snapshot wins over the 64 GB setting (else InvalidBlockDeviceMapping)."""
    session = aws["session"]
    _image_snapshot(session, aws["gpu_ami"], 75)
    rc, out, err = run(LAUNCH + release, session=session)
    assert rc == 0, err
    ec2 = aws["client"]("ec2")
    roles = by_role(fleet(aws))
    sizes = {}
    for role, insts in roles.items():
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                                 "Values": [i["InstanceId"] for i in insts]}])["Volumes"]
        sizes[role] = {v["Size"] for v in volumes}
    assert sizes == {"worker": {75}, "frontend": {64}, "client": {64}}
    # The same hook refuses the old behaviour (a fixed 64 GB): the reproduction is faithful.
    with pytest.raises(ClientError, match="InvalidBlockDeviceMapping"):
        session.client("ec2", endpoint_url=aws["url"]).run_instances(
            ImageId=aws["gpu_ami"], InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1, BlockDeviceMappings=[
                {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 64}}])
    rc, out, err = run(["launch", "simple", "--worker-type", "g4dn.xlarge", "--dry-run"], session=session)
    assert f"worker image: {aws['gpu_ami']}, root volume 75 GB (encrypted)" in out


def test_relaunch_of_a_stopped_fleet_forgets_old_ready_reports(aws, release):
    """Item 5: the launcher deletes the ready reports of the instances it starts (their old boot's)."""
    assert run(LAUNCH + release)[0] == 0
    s3 = aws["client"]("s3")
    bucket = f"parm-{aws['account']}-us-east-1"
    ids = [i["InstanceId"] for i in fleet(aws)]
    for i in ids:
        s3.put_object(Bucket=bucket, Key=f"simple/ready/{i}.json", Body=b'{"state": "ready"}')
    stopped = by_role(fleet(aws))["worker"][0]["InstanceId"]
    aws["client"]("ec2").stop_instances(InstanceIds=[stopped])
    assert run(LAUNCH + release)[0] == 0
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="simple/ready/")["Contents"]}
    assert left == {f"simple/ready/{i}.json" for i in ids if i != stopped}


def test_relaunch_while_a_sweep_runs_does_not_queue_another(aws, release):
    """Item 7: a second `launch` while the running frontend works on the sweep keeps the request."""
    assert run(LAUNCH + release)[0] == 0
    s3 = aws["client"]("s3")
    bucket = f"parm-{aws['account']}-us-east-1"
    request = read_json_object(s3, bucket, "simple/control/request.json")
    s3.put_object(Bucket=bucket, Key="simple/control/status.json",
                  Body=json.dumps({"id": request["id"], "state": "running"}).encode())
    rc, out, err = run(LAUNCH + release)
    assert rc == 0, err
    assert f"sweep {request['id']} is still in progress on the running fleet: no second sweep requested" in out
    assert read_json_object(s3, bucket, "simple/control/request.json") == request
    # Once it is done, a launch requests a new one.
    s3.put_object(Bucket=bucket, Key="simple/control/status.json",
                  Body=json.dumps({"id": request["id"], "state": "done"}).encode())
    import time
    time.sleep(1.1)  # request ids are UTC seconds
    assert run(LAUNCH + release)[0] == 0
    assert read_json_object(s3, bucket, "simple/control/request.json")["id"] != request["id"]


def test_terminate_in_the_wrong_region_names_the_right_one(aws, release):
    assert run(LAUNCH + release)[0] == 0
    rc, out, err = run(["terminate", "simple", "--region", "eu-west-1"])
    assert rc == 1
    assert err == (ERR + "no instances of experiment simple in eu-west-1; it has instances in us-east-1 (5): "
                   "give --region us-east-1\n")
    assert len(fleet(aws)) == 5


def test_terminate_cleanup_removes_group_role_and_empty_bucket(aws, release):
    assert run(LAUNCH + release)[0] == 0
    rc, out, err = run(["terminate", "simple", "--cleanup"])
    assert rc == 0, err
    bucket = f"parm-{aws['account']}-us-east-1"
    assert "deleted security group sg-" in out and "deleted IAM role parm-simple-node" in out
    assert "deleted instance profile parm-simple-node" in out
    assert "deleted the deployment's TLS files" in out
    assert f"kept bucket {bucket}: it holds" in out  # the release, config, fleet: not empty
    ec2, iam, s3 = aws["client"]("ec2"), aws["client"]("iam"), aws["client"]("s3")
    assert ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["parm-simple"]}])[
        "SecurityGroups"] == []
    with pytest.raises(ClientError, match="NoSuchEntity"):
        iam.get_role(RoleName="parm-simple-node")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any(k.startswith("simple/tls/") for k in keys)
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    rc, out, err = run(["terminate", "simple", "--cleanup"])
    assert rc == 0, err
    assert f"deleted bucket {bucket}" in out
    assert s3.list_buckets()["Buckets"] == []


def test_every_s3_call_names_the_expected_bucket_owner(aws, release):
    """Security: a predictable bucket name pre-created by someone else is never used."""
    session = aws["session"]
    missing = []

    def check(model, params, **_):
        if model.name not in ("CreateBucket", "ListBuckets") and "ExpectedBucketOwner" not in params:
            missing.append(model.name)

    session.events.register("provide-client-params.s3", check)
    assert run(LAUNCH + release, session=session)[0] == 0
    assert run(["status", "simple"], session=session)[0] == 0
    assert run(["terminate", "simple", "--cleanup"], session=session)[0] == 0
    assert missing == []


def test_a_bucket_of_another_account_is_refused(aws, release):
    session = aws["session"]

    def foreign(model, params, **_):  # S3's answer to HeadBucket with the wrong ExpectedBucketOwner
        raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    session.events.register("before-parameter-build.s3.HeadBucket", foreign)
    rc, out, err = run(LAUNCH + release, session=session)
    assert rc == 1
    assert err.startswith(ERR + f"bucket parm-{aws['account']}-us-east-1 exists but is not owned by account "
                          f"{aws['account']}")
    assert fleet(aws) == []


def test_a_user_bucket_without_public_access_block_is_refused(aws, release):
    s3 = aws["client"]("s3")
    s3.create_bucket(Bucket="my-open-bucket")
    rc, out, err = run(LAUNCH + release + ["--bucket", "my-open-bucket"])
    assert rc == 1
    assert "bucket my-open-bucket: public access is not blocked" in err
    assert fleet(aws) == []
    s3.put_public_access_block(Bucket="my-open-bucket", PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    s3.put_bucket_encryption(Bucket="my-open-bucket", ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    rc, out, err = run(LAUNCH + release + ["--bucket", "my-open-bucket"])
    assert rc == 0, err


def test_status_shows_failed_nodes_with_their_reason(aws, release):
    """Item 6: a failed boot's report (state, reason, log tail) is on `status`."""
    assert run(LAUNCH + release)[0] == 0
    worker = by_role(fleet(aws))["worker"][0]["InstanceId"]
    s3 = aws["client"]("s3")
    bucket = f"parm-{aws['account']}-us-east-1"
    s3.put_object(Bucket=bucket, Key=f"simple/ready/{worker}.json", Body=json.dumps({
        "instance_id": worker, "role": "worker", "state": "failed",
        "reason": "boot failed at step 'apt-get' (exit 100)", "log_tail": "a\nE: Unable to locate package x"}).encode())
    rc, out, err = run(["status", "simple"])
    assert rc == 0, err
    assert f"FAILED worker {worker}: boot failed at step 'apt-get' (exit 100)" in out
    assert "  | E: Unable to locate package x" in out


def test_untracked_package_files_are_named(tmp_path):
    """Item 8: the nodes build from `git archive` of the commit; untracked files are not in it."""
    from deploy.aws.cli import untracked_note

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "new.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not a package file\n")
    note = untracked_note(tmp_path)
    assert note.startswith("1 untracked file(s) under the packages are NOT in the nodes' source archive")
    assert "services/new.py" in note and "notes.txt" not in note
    subprocess.run(["git", "-C", str(tmp_path), "add", "services/new.py"], check=True)
    assert untracked_note(tmp_path) is None
