"""Fleet plans, cost estimates and settings (no AWS involved)."""

import argparse

import pytest

from deploy.runner import config as config_mod
from deploy.aws import plan as plan_mod, settings as settings_mod
from deploy.aws.prices import ON_DEMAND_USD_PER_HOUR, hourly_usd
from deploy.aws.settings import AwsSettings


def load(name):
    return config_mod.load(f"configs/{name}.json")


def settings_from(argv, env=None):
    p = argparse.ArgumentParser()
    settings_mod.add_arguments(p)
    return settings_mod.from_args(p.parse_args(argv), env or {})


def test_fig9a_fleet_is_frontend_n_plus_n_over_k_workers_and_clients():
    plan = plan_mod.plan_fleet(load("fig9a"), AwsSettings())
    assert [(g.role, g.instance_type, g.count) for g in plan.groups] == [
        ("frontend", "c5.9xlarge", 1), ("worker", "p2.xlarge", 18), ("client", "m5.xlarge", 4)]
    assert plan.num_runs == 9 * 3 * 2
    rates = [150, 180, 210, 240, 270, 300, 330, 360, 390]
    expected_s = sum((100 + 100000) / r + 60 for r in rates) * 3 * 2
    assert plan.sweep_s == pytest.approx(expected_s)
    per_hour, sweep = plan.cost()
    assert per_hour == pytest.approx(1.53 + 18 * 0.90 + 4 * 0.192)
    assert sweep == pytest.approx(per_hour * expected_s / 3600)
    spot_hour, _ = plan.cost(spot=True, spot_discount=0.6)
    assert spot_hour == pytest.approx(per_hour * 0.4)


def test_largest_need_over_k_and_modes():
    # k = 2, 3, 4 with N = 12: equal/coded need 12 + 6 at k = 2, the most.
    assert plan_mod.plan_fleet(load("fig10"), AwsSettings()).group("worker").count == 18
    # cheap: N + N/k backups.
    assert plan_mod.plan_fleet(load("fig13"), AwsSettings()).group("worker").count == 18
    cfg = config_mod.parse({"experiment_id": "x", "redundancy_modes": ["none"], "num_models": [4, 8],
                            "send_rates": [10], "num_queries": [10], "num_clients": [1, 3],
                            "frontend_type": "c5.xlarge", "worker_type": "c5.xlarge", "client_type": "c5.xlarge"})
    plan = plan_mod.plan_fleet(cfg, AwsSettings())
    assert plan.group("worker").count == 8 and plan.group("client").count == 3


def test_overrides_and_local_types():
    plan = plan_mod.plan_fleet(load("fig9a"), AwsSettings(worker_type="g4dn.xlarge"))
    assert plan.group("worker").instance_type == "g4dn.xlarge"
    cfg = config_mod.parse({"experiment_id": "x", "redundancy_modes": ["none"], "send_rates": [1],
                            "num_queries": [1]})
    with pytest.raises(plan_mod.PlanError, match="frontend_type is 'local'.*--frontend-type"):
        plan_mod.plan_fleet(cfg, AwsSettings())


def test_unknown_price_is_reported_not_guessed():
    assert hourly_usd("x9.mega") is None
    plan = plan_mod.plan_fleet(load("simple"), AwsSettings(client_type="x9.mega"))
    assert plan.cost() == (None, None)
    text = plan_mod.format_plan(plan, AwsSettings(client_type="x9.mega"))
    assert "estimated cost: unknown (no price recorded for x9.mega)" in text
    assert ON_DEMAND_USD_PER_HOUR["c5.9xlarge"] == 1.53


def test_format_plan_lists_roles_reuse_and_cost():
    plan = plan_mod.plan_fleet(load("simple"), AwsSettings())
    reuse = {"worker": [{"InstanceId": "i-abc", "State": {"Name": "stopped"}}]}
    text = plan_mod.format_plan(plan, AwsSettings(), reuse=reuse, notes=["hello"])
    lines = text.splitlines()
    worker = next(line for line in lines if line.startswith("worker"))
    assert worker.split() == ["worker", "p2.xlarge", "3", "1", "2", "0.900"]
    assert "  reuse worker i-abc (stopped)" in lines
    per_hour = 1.53 + 3 * 0.9 + 0.192
    assert f"estimated cost: {per_hour:.2f} USD/h" in text
    assert lines[-1] == "note: hello"


def test_settings_flags_env_and_defaults():
    s = settings_from([])
    assert s.region == "us-east-1" and s.market == "on-demand" and s.ssh_cidr == "auto"
    assert s.ami_parameter_cpu.startswith("/aws/service/canonical/ubuntu/server/")
    assert "deeplearning" in s.ami_parameter_gpu
    s = settings_from(["--availability-zones", "eu-west-1b,eu-west-1a"],
                      {"PARM_AWS_REGION": "eu-west-1", "PARM_AWS_MARKET": "spot", "AWS_REGION": "us-west-2"})
    assert s.region == "eu-west-1" and s.spot and s.availability_zones == ("eu-west-1b", "eu-west-1a")
    assert settings_from(["--region", "ap-south-1"], {"PARM_AWS_REGION": "eu-west-1"}).region == "ap-south-1"
    with pytest.raises(settings_mod.SettingsError, match="not a CIDR"):
        settings_from(["--ssh-cidr", "my-laptop"])
    with pytest.raises(settings_mod.SettingsError, match="spot-discount"):
        settings_from(["--spot-discount", "1.5"])


@pytest.mark.parametrize("value", ["0.0.0.0/0", "203.0.113.0/24", "203.0.113.7/31", "::/0", "2001:db8::/64"])
def test_ssh_cidr_wider_than_one_address_is_refused(value):
    with pytest.raises(settings_mod.SettingsError, match="wider than one address"):
        settings_from(["--ssh-cidr", value])


@pytest.mark.parametrize("value", ["203.0.113.7", "300.1.1.1/32", "203.0.113.7/33", "203.0.113.8/29x",
                                   "203.0.113.7/32/1", "", "2001:db8::1/129"])
def test_malformed_ssh_cidr_is_refused(value):
    with pytest.raises(settings_mod.SettingsError):
        settings_from(["--ssh-cidr", value])


def test_one_address_ssh_cidrs_are_accepted():
    assert settings_from(["--ssh-cidr", "203.0.113.7/32"]).ssh_cidr == "203.0.113.7/32"
    assert settings_from(["--ssh-cidr", "2001:db8::7/128"]).ssh_cidr == "2001:db8::7/128"
    assert settings_from([], {"PARM_AWS_SSH_CIDR": "none"}).ssh_cidr == "none"


def test_ssh_cidr_detection_and_modes():
    from deploy.aws import network
    from deploy.aws.session import AwsError

    assert network.detect_ssh_cidr(lambda: "198.51.100.4\n") == "198.51.100.4/32"
    with pytest.raises(AwsError, match="could not find your public address.*--ssh-cidr"):
        network.detect_ssh_cidr(lambda: "<html>proxy error</html>")

    def offline():
        raise OSError("network unreachable")

    with pytest.raises(AwsError, match="network unreachable"):
        network.detect_ssh_cidr(offline)
    key = {"key_name": "mykey"}
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="none", **key)) is None
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="192.0.2.1/32", **key)) == "192.0.2.1/32"
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="auto", **key), fetch=lambda: "192.0.2.9") == "192.0.2.9/32"
    # No key pair: nobody can log in, so no SSH rule at all.
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="192.0.2.1/32")) is None
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="auto"), fetch=lambda: "192.0.2.9") is None


def test_source_archive_is_the_committed_tree(tmp_path):
    import tarfile

    from deploy.aws.cli import source_archive

    path, _ = source_archive(tmp_path)
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    assert {"parm-src/pyproject.toml", "parm-src/setup.py", "parm-src/deploy/aws/cli.py"} <= names
    assert not any("/.venv/" in n or n.endswith(".so") for n in names)


def test_node_policy_is_limited_to_the_prefix():
    from deploy.aws.iam import node_policy

    policy = node_policy("bkt", "fig9a", "us-east-1", "123456789012")
    actions = sorted(a for s in policy["Statement"] for a in s["Action"])
    assert actions == ["ec2:StopInstances", "ec2:TerminateInstances", "s3:GetObject", "s3:ListBucket",
                       "s3:PutObject"]
    ec2 = next(s for s in policy["Statement"] if "ec2:StopInstances" in s["Action"])
    assert ec2["Resource"] == ["arn:aws:ec2:us-east-1:123456789012:instance/*"]
    assert ec2["Condition"] == {"StringEquals": {"aws:ResourceTag/parm:experiment": "fig9a"}}
    put = next(s for s in policy["Statement"] if s["Action"] == ["s3:PutObject"])
    assert put["Resource"] == ["arn:aws:s3:::bkt/fig9a/ready/*", "arn:aws:s3:::bkt/fig9a/results/*",
                               "arn:aws:s3:::bkt/fig9a/control/status.json"]


PAPER_CONFIGS = ["simple", "fig9a", "fig9b", "fig10", "fig11", "fig12", "fig13", "batch_size_1", "batch_size_2",
                 "batch_size_4"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_plans_and_passes_the_type_check_or_names_the_fix(name):
    """Item 4 on the plans of every paper config: p2/p3 is an error naming g4dn.xlarge, unless --ami."""
    from deploy.aws.cli import check_types

    sweep = load(name)
    plan = plan_mod.plan_fleet(sweep, AwsSettings())
    assert plan.num_runs >= 1 and plan.group("frontend").count == 1
    assert plan.group("worker").count == max(sum(r.num_instances) for r in sweep.runs())
    old = [g for g in plan.groups if g.instance_type.split(".")[0] in ("p2", "p3")]
    if old:
        with pytest.raises(plan_mod.PlanError, match=f"use --{old[0].role}-type g4dn.xlarge"):
            check_types(plan, AwsSettings())
        check_types(plan, AwsSettings(ami="ami-0123456789abcdef0"))  # an explicit image: the user's call
        fixed = plan_mod.plan_fleet(sweep, AwsSettings(worker_type="g4dn.xlarge"))
        check_types(fixed, AwsSettings(worker_type="g4dn.xlarge"))
    else:
        check_types(plan, AwsSettings())


def test_ebs_cost_of_a_stopped_fleet():
    from deploy.aws.cli import _ebs_note
    from deploy.aws.prices import EBS_GP3_USD_PER_GB_MONTH

    plan = plan_mod.plan_fleet(load("fig9a"), AwsSettings(worker_type="g4dn.xlarge"))
    note = _ebs_note(plan, {"frontend": 64, "worker": 75, "client": 64})
    total = 64 + 18 * 75 + 4 * 64
    assert f"{total} GB gp3 = {total * EBS_GP3_USD_PER_GB_MONTH:.2f} USD/month" in note


def test_quota_groups():
    from deploy.aws.network import quota_group

    assert [quota_group(t) for t in ("g4dn.xlarge", "p2.xlarge", "c5.9xlarge", "m5.xlarge", "inf1.xlarge",
                                     "vt1.3xlarge", "x1e.xlarge", "f1.2xlarge")] == [
        "g", "p", "standard", "standard", "inf", "g", "x", "f"]
