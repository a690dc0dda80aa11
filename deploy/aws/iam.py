"""The instances' IAM role and instance profile (``parm-<experiment>-node``).

The nodes may read their experiment's prefix of the bucket, write only
their ready reports, the runner's status and the results, and stop or
terminate only the instances tagged with their experiment (the fleet stops
itself after the sweep); nothing else (no other bucket, prefix or
instance). Created if missing; the inline policy is rewritten on every
launch so that it follows the bucket setting. ``delete_instance_profile``
removes it all (``terminate --cleanup``).
"""

import json
import time

from deploy.aws.session import aws_errors

ASSUME_ROLE = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}
POLICY_NAME = "parm-experiment-bucket"


def role_name(experiment_id):
    return f"parm-{experiment_id}-node"


def role_arn(account_id, experiment_id):
    return f"arn:aws:iam::{account_id}:role/{role_name(experiment_id)}"


def node_policy(bucket, experiment_id, region="*", account_id="*"):
    """The inline policy: read ``EXP/*``, write ``EXP/{ready,results,control/status}``, stop the fleet."""
    prefix = f"arn:aws:s3:::{bucket}/{experiment_id}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{prefix}/*"]},
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"],
             "Condition": {"StringLike": {"s3:prefix": [f"{experiment_id}/*"]}}},
            {"Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [f"{prefix}/ready/*", f"{prefix}/results/*", f"{prefix}/control/status.json"]},
            {"Effect": "Allow", "Action": ["ec2:StopInstances", "ec2:TerminateInstances"],
             "Resource": [f"arn:aws:ec2:{region}:{account_id}:instance/*"],
             "Condition": {"StringEquals": {"aws:ResourceTag/parm:experiment": experiment_id}}},
        ],
    }


def ensure_instance_profile(clients, bucket, experiment_id):
    """Role + profile, created if missing -> (profile name, list of changes)."""
    name = role_name(experiment_id)
    changes = []
    iam = clients.iam
    with aws_errors("setting up the IAM role: "):
        try:
            iam.get_role(RoleName=name)
        except iam.exceptions.NoSuchEntityException:
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(ASSUME_ROLE),
                            Description=f"ParM experiment {experiment_id} nodes: read/write its S3 prefix only",
                            Tags=[{"Key": "parm:experiment", "Value": experiment_id}])
            changes.append(f"created IAM role {name}")
        iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(
            node_policy(bucket, experiment_id, clients.settings.region, clients.account_id())))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except iam.exceptions.NoSuchEntityException:
            profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            changes.append(f"created instance profile {name}")
        if not any(r["RoleName"] == name for r in profile.get("Roles", [])):
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
            changes.append(f"added role {name} to its instance profile")
            if clients.settings.endpoint_url is None:
                time.sleep(10)  # a new profile takes a few seconds to be usable by RunInstances
    return name, changes


def delete_instance_profile(clients, experiment_id):
    """Removes the experiment's instance profile and role (if they exist) -> list of changes."""
    name = role_name(experiment_id)
    iam = clients.iam
    changes = []
    with aws_errors("removing the IAM role: "):
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            for role in profile.get("Roles", []):
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
            iam.delete_instance_profile(InstanceProfileName=name)
            changes.append(f"deleted instance profile {name}")
        except iam.exceptions.NoSuchEntityException:
            pass
        try:
            for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
                iam.delete_role_policy(RoleName=name, PolicyName=policy)
            iam.delete_role(RoleName=name)
            changes.append(f"deleted IAM role {name}")
        except iam.exceptions.NoSuchEntityException:
            pass
    return changes
