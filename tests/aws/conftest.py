"""Fixtures of the AWS tests: a moto server on a free loopback port, fake credentials.

No test reaches AWS: every client is pointed at the moto server through
``PARM_AWS_ENDPOINT_URL``, and the credentials are fake. The server runs in
a thread of the test process (``ThreadedMotoServer``) and is stopped at the
end of the module; its state is reset before every test.
"""

import json
import urllib.request

import pytest

from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _fake_env(monkeypatch, tmp_path):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "PARM_AWS_BUCKET", "PARM_AWS_AMI",
                 "PARM_AWS_REGION", "AWS_REGION", "PARM_AWS_MARKET", "PARM_AWS_AZS", "PARM_AWS_SUBNET_IDS",
                 "PARM_AWS_KEY_NAME", "PARM_AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment with no AWS credentials at all."""
    _fake_env(monkeypatch, tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)


@pytest.fixture
def aws(moto_url, monkeypatch, tmp_path):
    """Fake credentials, endpoint = the (reset) moto server, AMI parameters of moto images.

    Yields a ``boto3.session.Session`` factory-ready dict: url and clients.
    """
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=30).read()
    _fake_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("PARM_AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("PARM_AWS_SSH_CIDR", "203.0.113.7/32")
    session = boto3.session.Session(region_name=REGION)

    def client(name):
        return session.client(name, endpoint_url=moto_url, region_name=REGION)

    ec2 = client("ec2")
    images = ec2.describe_images(Owners=["099720109477"])["Images"]  # Canonical
    ubuntu = sorted(i["ImageId"] for i in images if "ubuntu" in i.get("Name", "").lower())[0]
    dl = sorted(i["ImageId"] for i in ec2.describe_images(Owners=["898082745236"])["Images"])[0]
    ssm = client("ssm")
    ssm.put_parameter(Name="/parm-test/ubuntu", Value=ubuntu, Type="String")
    ssm.put_parameter(Name="/parm-test/gpu", Value=dl, Type="String")
    monkeypatch.setenv("PARM_AWS_AMI_SSM_CPU", "/parm-test/ubuntu")
    monkeypatch.setenv("PARM_AWS_AMI_SSM_GPU", "/parm-test/gpu")
    yield {"url": moto_url, "session": session, "client": client, "ubuntu_ami": ubuntu, "gpu_ami": dl,
           "account": client("sts").get_caller_identity()["Account"]}


def read_json_object(s3, bucket, key):
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture(autouse=True)
def _private_tmp(tmp_path, monkeypatch):
    """Temporary files of this test and of the processes it starts (agents, their children) go under
    ``tmp_path`` (``ServiceProcess`` makes a ``parm-<name>-*`` folder per process and leaves it)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
