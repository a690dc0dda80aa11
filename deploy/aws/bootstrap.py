"""Fetches the project and the model artifacts from S3 onto a node.

This file is self-contained (standard library and boto3 only, no project
imports): the boot script embeds its source verbatim and runs it *before*
the project is installed. It reads ``EXPERIMENT/dist/release.json``,
downloads the wheel and the source archive it names into ``DEST/dist/``
and every object under ``EXPERIMENT/artifacts/`` into ``DEST/artifacts/``,
then prints ``{"wheel": path, "source": path, "artifacts": n}`` as JSON.

    python3 bootstrap.py --bucket B --experiment E --dest /opt/parm
"""

import argparse
import json
import os
import sys


def fetch(s3, bucket, experiment, dest):
    """Downloads release and artifacts -> {"wheel", "source", "artifacts"}."""
    release = json.loads(s3.get_object(Bucket=bucket, Key=f"{experiment}/dist/release.json")["Body"].read())
    out = {"wheel": None, "source": None, "artifacts": 0}
    os.makedirs(os.path.join(dest, "dist"), exist_ok=True)
    for name in ("wheel", "source"):
        if release.get(name):
            path = os.path.join(dest, "dist", release[name].rsplit("/", 1)[-1])
            s3.download_file(bucket, release[name], path)
            out[name] = path
    prefix = f"{experiment}/artifacts/"
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/") or ".." in rel.split("/"):
                continue
            path = os.path.join(dest, "artifacts", *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, obj["Key"], path)
            out["artifacts"] += 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch the ParM release and artifacts from S3.")
    p.add_argument("--bucket", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--dest", default="/opt/parm")
    p.add_argument("--region", default=None)
    p.add_argument("--endpoint-url", default=None)
    args = p.parse_args(argv)
    import boto3

    s3 = boto3.client("s3", region_name=args.region, endpoint_url=args.endpoint_url)
    print(json.dumps(fetch(s3, args.bucket, args.experiment, args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
