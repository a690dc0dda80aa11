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

Uploads of artifacts skip files whose SHA-256 (stored as object metadata)
is unchanged, so a relaunch uploads only what changed.
"""

import hashlib
import json
import pathlib

from deploy.aws.session import aws_errors

RELEASE_KEY = "dist/release.json"


def default_bucket(account_id, region):
    return f"parm-{account_id}-{region}"


def key(experiment_id, *parts):
    return "/".join([experiment_id, *parts])


def bucket_exists(clients, bucket):
    from botocore.exceptions import ClientError

    try:
        clients.s3.head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchBucket", "NotFound"):
            return False
        with aws_errors(f"checking bucket {bucket}: "):
            raise


def ensure_bucket(clients, bucket):
    """Creates the bucket (private, encrypted) if missing -> list of changes."""
    if bucket_exists(clients, bucket):
        return []
    region = clients.settings.region
    with aws_errors(f"creating bucket {bucket}: "):
        kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        clients.s3.create_bucket(Bucket=bucket, **kwargs)
        clients.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        })
        clients.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    return [f"created bucket {bucket}"]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_file(clients, bucket, object_key, path):
    """Uploads ``path`` unless the object has the same SHA-256 -> True if uploaded."""
    from botocore.exceptions import ClientError

    digest = sha256_file(path)
    try:
        head = clients.s3.head_object(Bucket=bucket, Key=object_key)
        if head.get("Metadata", {}).get("sha256") == digest:
            return False
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
            with aws_errors(f"checking s3://{bucket}/{object_key}: "):
                raise
    with aws_errors(f"uploading {path}: "):
        clients.s3.upload_file(str(path), bucket, object_key, ExtraArgs={"Metadata": {"sha256": digest}})
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


def upload_dir(clients, bucket, prefix, directory):
    """Uploads every file under ``directory`` to ``prefix/<relative path>`` -> (uploaded, unchanged)."""
    directory = pathlib.Path(directory)
    uploaded = unchanged = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if upload_file(clients, bucket, f"{prefix}/{rel}", path):
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
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
                if not rel or rel.endswith("/") or ".." in pathlib.PurePosixPath(rel).parts:
                    continue
                dest = directory / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                clients.s3.download_file(bucket, obj["Key"], str(dest))
                out.append(dest)
    return out


def put_json(clients, bucket, object_key, value):
    with aws_errors(f"writing s3://{bucket}/{object_key}: "):
        clients.s3.put_object(Bucket=bucket, Key=object_key, Body=json.dumps(value, indent=1).encode(),
                              ContentType="application/json")


def get_json(clients, bucket, object_key):
    """The object's JSON, or None if there is no such object."""
    from botocore.exceptions import ClientError

    try:
        body = clients.s3.get_object(Bucket=bucket, Key=object_key)["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return None
        with aws_errors(f"reading s3://{bucket}/{object_key}: "):
            raise
    return json.loads(body)


def list_keys(clients, bucket, prefix):
    with aws_errors(f"listing s3://{bucket}/{prefix}: "):
        paginator = clients.s3.get_paginator("list_objects_v2")
        return [o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
