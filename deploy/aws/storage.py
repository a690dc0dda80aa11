"""The experiment's S3 prefix: what goes up at launch and comes back after.

Layout under ``s3://BUCKET/EXPERIMENT/``:

| key | written by | content |
|---|---|---|
| ``dist/release.json`` | launch | ``{"wheel": key, "source": key}`` |
| ``dist/<wheel>``, ``dist/<source>.tar.gz`` | launch | the project |
| ``artifacts/...`` | launch | the ``artifacts/`` dir (models, manifests) |
| ``config.json`` | launch | the sweep config |
| ``fleet.json`` | launch | role -> private IPs, agent port |
| ``control/request.json`` | launch | ``{"id", "config"}``: run this sweep |
| ``control/status.json`` | runner (frontend node) | state of the current sweep |
| ``ready/<instance-id>.json`` | every node | boot finished, services up |
| ``results/<request-id>/...`` | runner | the results folder of the sweep |
| ``tls/ca.pem``, ``tls/node.pem``, ``tls/node.key`` | launch | the deployment's CA and node key (agent mTLS) |

Uploads of artifacts skip files whose SHA-256 (stored as object metadata)
is unchanged, so a relaunch uploads only what changed.

Every call passes ``ExpectedBucketOwner`` (the caller's account, or
``settings.bucket_owner`` on the nodes): a bucket of the same predictable
name created by someone else is refused, never used (it would serve the
wheel that the nodes install as root). The bucket is private (public
access blocked), encrypted, and its policy denies any access without TLS
and reads of ``EXPERIMENT/tls/`` by anyone but that experiment's node
role. A bucket given with ``--bucket`` is checked for public-access
blocking and encryption, never changed.
"""

import hashlib
import json
import pathlib

from deploy.aws.session import AwsError, aws_errors

RELEASE_KEY = "dist/release.json"
TLS_PREFIX = "tls"
POLICY_SID_TLS = "DenyInsecureTransport"
POLICY_SID_KEYS = "ParmTlsKeysNodeRoleOnly"


def _owner(clients):
    return {"ExpectedBucketOwner": clients.bucket_owner()}


def default_bucket(account_id, region):
    return f"parm-{account_id}-{region}"


def key(experiment_id, *parts):
    return "/".join([experiment_id, *parts])


def bucket_exists(clients, bucket):
    from botocore.exceptions import ClientError

    try:
        clients.s3.head_bucket(Bucket=bucket, **_owner(clients))
        return True
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in ("404", "NoSuchBucket", "NotFound"):
            return False
        if code in ("403", "AccessDenied", "Forbidden"):
            raise AwsError(f"bucket {bucket} exists but is not owned by account {clients.bucket_owner()} (or is "
                           "not accessible); give another --bucket") from None
        with aws_errors(f"checking bucket {bucket}: "):
            raise


def check_user_bucket(clients, bucket):
    """``AwsError`` unless a user-given bucket blocks public access and encrypts by default."""
    from botocore.exceptions import ClientError

    problems = []
    try:
        block = clients.s3.get_public_access_block(Bucket=bucket, **_owner(clients))["PublicAccessBlockConfiguration"]
        if not all(block.get(k) for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                                          "RestrictPublicBuckets")):
            problems.append("public access is not fully blocked")
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchPublicAccessBlockConfiguration":
            with aws_errors(f"checking bucket {bucket}: "):
                raise
        problems.append("public access is not blocked")
    try:
        rules = clients.s3.get_bucket_encryption(Bucket=bucket, **_owner(clients))[
            "ServerSideEncryptionConfiguration"]["Rules"]
        if not rules:
            problems.append("default encryption is off")
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ServerSideEncryptionConfigurationNotFoundError":
            with aws_errors(f"checking bucket {bucket}: "):
                raise
        problems.append("default encryption is off")
    if problems:
        raise AwsError(f"bucket {bucket}: {'; '.join(problems)} (the nodes install code from it as root); "
                       "turn on Block Public Access and default encryption, or leave out --bucket")


def ensure_bucket(clients, bucket, *, user_given=False):
    """Creates the bucket (private, encrypted) if missing -> list of changes; checks a user-given one."""
    if bucket_exists(clients, bucket):
        if user_given:
            check_user_bucket(clients, bucket)
        return []
    if user_given:
        raise AwsError(f"bucket {bucket} (--bucket) does not exist in this account; create it, or leave out --bucket")
    region = clients.settings.region
    with aws_errors(f"creating bucket {bucket}: "):
        kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        clients.s3.create_bucket(Bucket=bucket, **kwargs)
        clients.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        }, **_owner(clients))
        clients.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}, **_owner(clients))
    return [f"created bucket {bucket}"]


def _sid(experiment_id):
    return POLICY_SID_KEYS + "".join(c for c in experiment_id.title() if c.isalnum())


def bucket_policy(bucket, current=None, *, experiment_id, node_role_arn, tls_only=True):
    """``current`` policy + deny-without-TLS + "only EXP's node role reads EXP/tls/" (idempotent).

    ``tls_only=False`` leaves out the deny-without-TLS statement: only for a
    plain-http endpoint override (a local emulator such as moto, which
    evaluates bucket policies and would then refuse every call).
    """
    policy = dict(current or {"Version": "2012-10-17", "Statement": []})
    ours = {POLICY_SID_TLS, _sid(experiment_id)}
    statements = [st for st in policy.get("Statement", []) if st.get("Sid") not in ours]
    if tls_only:
        statements.append({
            "Sid": POLICY_SID_TLS, "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        })
    statements.append({
        "Sid": _sid(experiment_id), "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
        "Resource": [f"arn:aws:s3:::{bucket}/{experiment_id}/{TLS_PREFIX}/*"],
        "Condition": {"ArnNotEquals": {"aws:PrincipalArn": node_role_arn}},
    })
    policy["Statement"] = statements
    return policy


def ensure_bucket_policy(clients, bucket, *, experiment_id, node_role_arn):
    """Merges this experiment's statements into the bucket policy -> list of changes."""
    from botocore.exceptions import ClientError

    current = None
    try:
        current = json.loads(clients.s3.get_bucket_policy(Bucket=bucket, **_owner(clients))["Policy"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucketPolicy":
            with aws_errors(f"reading the policy of bucket {bucket}: "):
                raise
    endpoint = clients.settings.endpoint_url or ""
    wanted = bucket_policy(bucket, current, experiment_id=experiment_id, node_role_arn=node_role_arn,
                           tls_only=not endpoint.startswith("http://"))
    if wanted == current:
        return []
    with aws_errors(f"setting the policy of bucket {bucket}: "):
        clients.s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(wanted), **_owner(clients))
    tls = "TLS only" if any(st.get("Sid") == POLICY_SID_TLS for st in wanted["Statement"]) else \
        "NOT TLS-only (plain-http endpoint override)"
    return [f"bucket policy of {bucket}: {tls}; {experiment_id}/{TLS_PREFIX}/ readable by its node role only"]


def delete_keys(clients, bucket, keys):
    """Deletes ``keys`` (missing ones are fine)."""
    keys = list(keys)
    with aws_errors(f"deleting from s3://{bucket}: "):
        for i in range(0, len(keys), 1000):
            clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                             "Quiet": True}, **_owner(clients))


def delete_bucket_if_empty(clients, bucket):
    """Deletes the bucket when it holds nothing -> (deleted, number of objects left)."""
    with aws_errors(f"listing s3://{bucket}: "):
        reply = clients.s3.list_objects_v2(Bucket=bucket, MaxKeys=1000, **_owner(clients))
    n = reply.get("KeyCount", 0)
    if n:
        return False, n
    with aws_errors(f"deleting bucket {bucket}: "):
        clients.s3.delete_bucket(Bucket=bucket, **_owner(clients))
    return True, 0


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_file(clients, bucket, object_key, path, *, skip_unchanged=True):
    """Uploads ``path`` -> True if uploaded.

    With ``skip_unchanged`` (the launcher) an object with the same SHA-256
    is left alone; that needs a HEAD, which the nodes' role cannot rely on
    (a HEAD of a missing key under its prefix-scoped ``ListBucket`` is 403,
    not 404), so the nodes upload with ``skip_unchanged=False``: plain PUTs.
    """
    from botocore.exceptions import ClientError

    digest = sha256_file(path)
    if skip_unchanged:
        try:
            head = clients.s3.head_object(Bucket=bucket, Key=object_key, **_owner(clients))
            if head.get("Metadata", {}).get("sha256") == digest:
                return False
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                with aws_errors(f"checking s3://{bucket}/{object_key}: "):
                    raise
    # One PutObject (not upload_file, whose failures escape as boto3's S3UploadFailedError).
    with aws_errors(f"uploading {path}: "), open(path, "rb") as body:
        clients.s3.put_object(Bucket=bucket, Key=object_key, Body=body, Metadata={"sha256": digest},
                              **_owner(clients))
    return True


def upload_release(clients, bucket, experiment_id, wheel_path, source_path):
    """Uploads the wheel and the source archive and points ``release.json`` at them."""
    release = {}
    for name, path in (("wheel", wheel_path), ("source", source_path)):
        if path is None:
            continue
        path = pathlib.Path(path)
        object_key = key(experiment_id, "dist", path.name)
        upload_file(clients, bucket, object_key, path)
        release[name] = object_key
    put_json(clients, bucket, key(experiment_id, RELEASE_KEY), release)
    return release


def upload_dir(clients, bucket, prefix, directory, *, skip_unchanged=True):
    """Uploads every file under ``directory`` to ``prefix/<relative path>`` -> (uploaded, unchanged)."""
    directory = pathlib.Path(directory)
    uploaded = unchanged = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if upload_file(clients, bucket, f"{prefix}/{rel}", path, skip_unchanged=skip_unchanged):
            uploaded += 1
        else:
            unchanged += 1
    return uploaded, unchanged


def download_prefix(clients, bucket, prefix, directory):
    """Downloads every object under ``prefix/`` into ``directory`` -> list of local paths."""
    directory = pathlib.Path(directory)
    out = []
    with aws_errors(f"downloading s3://{bucket}/{prefix}: "):
        paginator = clients.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", **_owner(clients)):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
                if not rel or rel.endswith("/") or ".." in pathlib.PurePosixPath(rel).parts:
                    continue
                dest = directory / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                clients.s3.download_file(bucket, obj["Key"], str(dest), ExtraArgs=_owner(clients))
                out.append(dest)
    return out


def put_json(clients, bucket, object_key, value):
    with aws_errors(f"writing s3://{bucket}/{object_key}: "):
        clients.s3.put_object(Bucket=bucket, Key=object_key, Body=json.dumps(value, indent=1).encode(),
                              ContentType="application/json", **_owner(clients))


def get_json(clients, bucket, object_key):
    """The object's JSON, or None if there is no such object."""
    from botocore.exceptions import ClientError

    try:
        body = clients.s3.get_object(Bucket=bucket, Key=object_key, **_owner(clients))["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return None
        with aws_errors(f"reading s3://{bucket}/{object_key}: "):
            raise
    return json.loads(body)


def list_keys(clients, bucket, prefix):
    with aws_errors(f"listing s3://{bucket}/{prefix}: "):
        paginator = clients.s3.get_paginator("list_objects_v2")
        return [o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **_owner(clients))
                for o in page.get("Contents", [])]
