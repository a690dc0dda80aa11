"""Fetches the project from S3 onto a node, and reports a failed boot.

This file is self-contained: Python 3.10+ standard library only, no
project imports and no boto3. The boot script embeds its source verbatim
and runs it with the image's ``python3`` *before* anything is installed, so
that even a boot that fails at ``apt-get`` can say so in S3. It talks to S3
with its own small Signature-V4 client (``S3``), with the instance role's
credentials from the instance metadata service (IMDSv2), or from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when those are set (tests).
Every request carries ``x-amz-expected-bucket-owner`` when the owner is
known, so a bucket of the same name in another account is refused.

    python3 bootstrap.py fetch --bucket B --experiment E --region R --dest /opt/parm
        reads E/dist/release.json; downloads the wheel and the source archive
        it names into DEST/dist/, E/artifacts/ into DEST/artifacts/ and E/tls/
        (the deployment's CA and node key) into DEST/tls/ (0600); prints
        {"wheel", "source", "artifacts", "tls"} as JSON.
    python3 bootstrap.py report --bucket B --experiment E --region R --role ROLE \\
            --instance-id I --reason TEXT [--log FILE]
        writes E/ready/I.json with state "failed", the reason, this boot's id
        and the last lines of FILE.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

IMDS_URL = "http://169.254.169.254"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
RETRIES = 5
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 6000


class S3Error(RuntimeError):
    """An S3 request failed (one line: method, key, HTTP status, AWS error code)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def boot_id():
    """This boot's id (Linux), or "" elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _imds(path, token=None, method="GET", headers=None, timeout_s=5.0):
    request = urllib.request.Request(f"{os.environ.get('PARM_IMDS_URL', IMDS_URL)}{path}", method=method,
                                     headers=dict(headers or {}))
    if token:
        request.add_header("X-aws-ec2-metadata-token", token)
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return reply.read().decode()


def credentials():
    """(access key, secret key, session token or None): the environment's, else the instance role's."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
                os.environ.get("AWS_SESSION_TOKEN") or None)
    token = _imds("/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    role = _imds("/latest/meta-data/iam/security-credentials/", token).split()[0]
    doc = json.loads(_imds(f"/latest/meta-data/iam/security-credentials/{role}", token))
    return doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token")


def _quote(text, safe="-_.~"):
    return urllib.parse.quote(text, safe=safe)


def sign_v4(method, url, headers, payload_sha256, *, region, access_key, secret_key, now, service="s3"):
    """Adds ``x-amz-date`` and ``Authorization`` (AWS Signature V4) to ``headers`` (a dict, modified)."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers["host"] = parts.netloc
    headers["x-amz-date"] = amz_date
    headers["x-amz-content-sha256"] = payload_sha256
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query))
    names = sorted(h.lower() for h in headers)
    lowered = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    canonical_headers = "".join(f"{n}:{lowered[n]}\n" for n in names)
    signed = ";".join(names)
    canonical = "\n".join([method, _quote(urllib.parse.unquote(parts.path) or "/", safe="-_.~/"),
                           canonical_query, canonical_headers, signed, payload_sha256])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
                                f"Signature={signature}")
    return headers


class S3:
    """The few S3 calls a booting node needs: get, put, list (with retries)."""

    def __init__(self, bucket, region, *, endpoint_url=None, expected_owner=None, creds=None):
        self.bucket = bucket
        self.region = region
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        self.expected_owner = expected_owner
        self.creds = creds or credentials()

    def url(self, key="", query=None):
        """Path style under an endpoint override or for dotted names (TLS), else virtual-host style."""
        if self.endpoint_url:
            base = f"{self.endpoint_url}/{self.bucket}"
        elif "." in self.bucket:
            base = f"https://s3.{self.region}.amazonaws.com/{self.bucket}"
        else:
            base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com"
        path = "/" + _quote(key, safe="-_.~/") if key else ("" if base.endswith(self.bucket) else "/")
        q = "?" + urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote) if query else ""
        return base + path + q

    def _request(self, method, key="", *, query=None, body=b"", content_type=None):
        url = self.url(key, query)
        last = None
        for attempt in range(RETRIES):
            headers = {}
            if self.expected_owner:
                headers["x-amz-expected-bucket-owner"] = self.expected_owner
            if content_type:
                headers["content-type"] = content_type
            access, secret, token = self.creds
            if token:
                headers["x-amz-security-token"] = token
            sign_v4(method, url, headers, hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
                    region=self.region, access_key=access, secret_key=secret,
                    now=datetime.datetime.now(datetime.timezone.utc))
            headers.pop("host")
            request = urllib.request.Request(url, data=body if method == "PUT" else None, method=method,
                                             headers=headers)
            try:
                return urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                code = text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""
                last = S3Error(f"{method} s3://{self.bucket}/{key}: HTTP {exc.code} {code}".strip(), exc.code)
                if exc.code < 500 and exc.code != 429:
                    raise last from None
            except (urllib.error.URLError, OSError) as exc:
                last = S3Error(f"{method} s3://{self.bucket}/{key}: {exc}")
            time.sleep(min(2 ** attempt, 20))
        raise last

    def get(self, key):
        with self._request("GET", key) as reply:
            return reply.read()

    def download(self, key, path):
        tmp = path + ".part"
        with self._request("GET", key) as reply, open(tmp, "wb") as f:
            while True:
                chunk = reply.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        os.replace(tmp, path)

    def put(self, key, body, content_type="application/octet-stream"):
        self._request("PUT", key, body=body, content_type=content_type).close()

    def list(self, prefix, page_size=1000):
        """Every key under ``prefix`` (ListObjectsV2, all pages of ``page_size``)."""
        keys, token = [], None
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(page_size)}
            if token:
                query["continuation-token"] = token
            with self._request("GET", query=query) as reply:
                root = ET.fromstring(reply.read())
            keys.extend(c.findtext(f"{S3_NS}Key") for c in root.iter(f"{S3_NS}Contents"))
            token = root.findtext(f"{S3_NS}NextContinuationToken")
            if root.findtext(f"{S3_NS}IsTruncated") != "true" or not token:
                return keys


def _fetch_prefix(s3, prefix, dest, mode=None):
    n = 0
    for object_key in s3.list(prefix):
        rel = object_key[len(prefix):]
        if not rel or rel.endswith("/") or ".." in rel.split("/"):
            continue
        path = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download(object_key, path)
        if mode is not None:
            os.chmod(path, mode)
        n += 1
    return n


def fetch(s3, experiment, dest):
    """Downloads release, artifacts and TLS files -> {"wheel", "source", "artifacts", "tls"}."""
    release = json.loads(s3.get(f"{experiment}/dist/release.json"))
    out = {"wheel": None, "source": None, "artifacts": 0, "tls": 0}
    os.makedirs(os.path.join(dest, "dist"), exist_ok=True)
    for name in ("wheel", "source"):
        if release.get(name):
            path = os.path.join(dest, "dist", release[name].rsplit("/", 1)[-1])
            s3.download(release[name], path)
            out[name] = path
    out["artifacts"] = _fetch_prefix(s3, f"{experiment}/artifacts/", os.path.join(dest, "artifacts"))
    tls_dir = os.path.join(dest, "tls")
    os.makedirs(tls_dir, mode=0o700, exist_ok=True)
    out["tls"] = _fetch_prefix(s3, f"{experiment}/tls/", tls_dir, mode=0o600)
    return out


def log_tail(path, lines=LOG_TAIL_LINES, chars=LOG_TAIL_CHARS):
    """The last ``lines`` lines of ``path`` (at most ``chars`` characters), or ""."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def failed_report(*, role, instance_id, reason, log_path=None):
    return {"instance_id": instance_id, "role": role, "state": "failed", "reason": reason,
            "boot_id": boot_id(), "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "log_tail": log_tail(log_path) if log_path else ""}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bootstrap.py", description="Fetch the ParM release from S3; report a failed boot.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("fetch", "report"):
        s = sub.add_parser(name)
        s.add_argument("--bucket", required=True)
        s.add_argument("--experiment", required=True)
        s.add_argument("--region", required=True)
        s.add_argument("--bucket-owner", default=None, help="expected owner account of the bucket")
        s.add_argument("--endpoint-url", default=None)
    sub.choices["fetch"].add_argument("--dest", default="/opt/parm")
    report = sub.choices["report"]
    report.add_argument("--role", required=True)
    report.add_argument("--instance-id", required=True)
    report.add_argument("--reason", required=True)
    report.add_argument("--log", default=None, help="log file whose tail goes into the report")
    args = p.parse_args(argv)
    try:
        s3 = S3(args.bucket, args.region, endpoint_url=args.endpoint_url, expected_owner=args.bucket_owner)
        if args.command == "fetch":
            print(json.dumps(fetch(s3, args.experiment, args.dest)))
        else:
            body = failed_report(role=args.role, instance_id=args.instance_id, reason=args.reason,
                                 log_path=args.log)
            s3.put(f"{args.experiment}/ready/{args.instance_id}.json", json.dumps(body, indent=1).encode(),
                   "application/json")
    except (S3Error, OSError, KeyError, ValueError) as exc:
        print(f"bootstrap.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
