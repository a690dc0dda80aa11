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
    with pytest.raises(settings_mod.SettingsError, match="whole internet"):
        settings_from(["--ssh-cidr", "0.0.0.0/0"])
    with pytest.raises(settings_mod.SettingsError, match="not a CIDR"):
        settings_from(["--ssh-cidr", "my-laptop"])
    with pytest.raises(settings_mod.SettingsError, match="spot-discount"):
        settings_from(["--spot-discount", "1.5"])


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
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="none")) is None
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="192.0.2.0/24")) == "192.0.2.0/24"
    assert network.resolve_ssh_cidr(AwsSettings(ssh_cidr="auto"), fetch=lambda: "192.0.2.9") == "192.0.2.9/32"


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

    policy = node_policy("bkt", "fig9a")
    actions = sorted(a for s in policy["Statement"] for a in s["Action"])
    assert actions == ["s3:GetObject", "s3:ListBucket", "s3:PutObject"]
    put = next(s for s in policy["Statement"] if s["Action"] == ["s3:PutObject"])
    assert put["Resource"] == ["arn:aws:s3:::bkt/fig9a/ready/*", "arn:aws:s3:::bkt/fig9a/results/*",
                               "arn:aws:s3:::bkt/fig9a/control/status.json"]
