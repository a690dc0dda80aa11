"""``python -m deploy.aws`` end to end against a moto server (EC2, S3, SSM, IAM, STS).

Nothing here reaches AWS: see conftest.py.
"""

import base64
import io
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


def run(argv, session=None):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, out=out, err=err, session=session)
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
        assert ("ORT_EXTRA=gpu" in script) == (role == "worker")
        assert ("deploy.aws.node runner" in script) == (role == "frontend")
    # One zone for the whole fleet.
    assert len({i["Placement"]["AvailabilityZone"] for v in roles.values() for i in v}) == 1

    # Security group: all traffic within the group, SSH from the configured range, nothing from the world.
    groups = {g["GroupId"] for i in fleet(aws) for g in i["SecurityGroups"]}
    assert len(groups) == 1
    group = ec2.describe_security_groups(GroupIds=list(groups))["SecurityGroups"][0]
    assert group["GroupName"] == "parm-simple"
    perms = group["IpPermissions"]
    assert len(perms) == 2
    within = next(p for p in perms if p["IpProtocol"] == "-1")
    assert [p["GroupId"] for p in within["UserIdGroupPairs"]] == [group["GroupId"]]
    assert within.get("IpRanges", []) == []
    ssh = next(p for p in perms if p["IpProtocol"] == "tcp")
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["203.0.113.7/32"]

    # IAM: the nodes may read the experiment's prefix only.
    iam = aws["client"]("iam")
    import json
    policy = iam.get_role_policy(RoleName="parm-simple-node", PolicyName="parm-experiment-bucket")["PolicyDocument"]
    policy = policy if isinstance(policy, dict) else json.loads(policy)
    bucket = f"parm-{aws['account']}-us-east-1"
    resources = [r for s in policy["Statement"] for r in s["Resource"]]
    assert f"arn:aws:s3:::{bucket}/simple/*" in resources
    assert all(r.startswith(f"arn:aws:s3:::{bucket}") for r in resources)

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
    public = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert public["BlockPublicAcls"] and public["RestrictPublicBuckets"]


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
    assert "GetCallerIdentity" in calls and "DescribeInstances" in calls
    assert fleet(aws) == []
    assert aws["client"]("s3").list_buckets()["Buckets"] == []
    lines = out.splitlines()
    assert lines[0] == "experiment simple: 2 runs, estimated sweep 0.07 h (253 s)"
    assert lines[4].split() == ["frontend", "c5.9xlarge", "1", "0", "1", "1.530"]
    assert lines[5].split() == ["worker", "g4dn.xlarge", "3", "0", "3", "0.526"]
    assert lines[6].split() == ["client", "m5.xlarge", "1", "0", "1", "0.192"]
    assert "estimated cost: 3.30 USD/h, 0.23 USD for the sweep" in out
    assert f"note: worker image: {aws['gpu_ami']}" in out


def test_dry_run_without_credentials_prints_the_plan(no_credentials):
    rc, out, err = run(["launch", "fig9a", "--dry-run"])
    assert rc == 0, err
    assert "worker    p2.xlarge        18     0     18      0.900" in out
    assert "reuse, zones and images not checked: checking credentials: no AWS credentials found" in out
    assert "use --worker-type g4dn.xlarge" in out


def test_missing_credentials_is_one_line(no_credentials):
    proc = subprocess.run([sys.executable, "-m", "deploy.aws", "launch", "simple", "--yes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "deploy.aws: checking credentials: no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY), or run `aws configure`"]


def test_unknown_instance_type_is_refused_before_anything_is_created(aws):
    rc, out, err = run(["launch", "fig9a", "--yes"])  # p2.xlarge is retired (and unknown to moto)
    assert rc == 1
    assert err == ("deploy.aws: unknown instance type(s) in region us-east-1: p2.xlarge "
                   "(override with --frontend-type/--worker-type/--client-type)\n")
    assert fleet(aws, "fig9a") == []
    rc, out, err = run(["launch", "fig9a", "--dry-run"])  # the plan is printed, then the error
    assert rc == 1 and "unknown instance type(s) in region us-east-1: p2.xlarge" in err
    assert "worker    p2.xlarge        18     0     18      0.900" in out
    assert "use --worker-type g4dn.xlarge" in out


def test_missing_key_pair_is_refused_before_anything_is_created(aws, release):
    rc, out, err = run(LAUNCH + release + ["--key-name", "nobody"])
    assert rc == 1
    assert err == ("deploy.aws: key pair 'nobody' is not in region us-east-1; create or import it, "
                   "or leave out --key-name\n")
    assert fleet(aws) == []
    aws["client"]("ec2").create_key_pair(KeyName="me")
    rc, out, err = run(LAUNCH + release + ["--key-name", "me"])
    assert rc == 0, err
    assert {i["KeyName"] for i in fleet(aws)} == {"me"}


def _fail_run_instances(session, code, on_calls, message=None):
    count = {"n": 0}

    def handler(**_):
        count["n"] += 1
        if count["n"] in on_calls:
            raise ClientError({"Error": {"Code": code, "Message": message or f"injected {code}"}},
                              "RunInstances")

    session.events.register("before-call.ec2.RunInstances", handler)
    return count


def test_quota_failure_names_what_was_already_launched(aws, release):
    session = aws["session"]
    _fail_run_instances(session, "VcpuLimitExceeded", on_calls={2})  # workers launch, clients fail
    rc, out, err = run(LAUNCH + release, session=session)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    workers = sorted(i["InstanceId"] for i in fleet(aws))
    assert len(workers) == 3
    assert "quota: RunInstances: VcpuLimitExceeded: injected VcpuLimitExceeded" in err
    for worker in workers:
        assert worker in err
    assert "python -m deploy.aws terminate CONFIG" in err


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
    assert "Launched before the failure: none" in err
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
    assert "0.0.0.0/0" not in cidrs and cidrs == ["203.0.113.7/32"]


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
    assert rc == 0 and out == "no instances of experiment simple to terminate\n"


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
                         (["launch", "simple", "--ssh-cidr", "0.0.0.0/0"], "whole internet")):
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
