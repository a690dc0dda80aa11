"""boto3 clients for one launch, and AWS errors as one-line messages.

Every client goes to ``settings.endpoint_url`` when it is set (tests point
it at a local moto server, so nothing reaches AWS). ``aws_errors`` turns
botocore's exceptions into ``AwsError`` with a message a user can act on;
the CLI prints that one line and exits non-zero.
"""

import contextlib

QUOTA_CODES = {
    "InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded",
    "InsufficientAddressCapacity", "RequestLimitExceeded",
}
CAPACITY_CODES = {
    "InsufficientInstanceCapacity", "Unsupported", "InsufficientCapacity", "SpotMaxPriceTooLow",
    "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
}

NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
    "or run `aws configure`"
)


class AwsError(RuntimeError):
    """An AWS problem, worded for the user (one line)."""


def error_code(exc):
    """The AWS error code of a botocore ``ClientError`` ('' for anything else)."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""


def describe(exc):
    """One line for a botocore exception."""
    from botocore import exceptions as bex

    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return NO_CREDENTIALS
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        op = getattr(exc, "operation_name", "") or "AWS call"
        code = err.get("Code", "error")
        message = " ".join(str(err.get("Message", "")).split())
        if code in ("InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure", "ExpiredToken",
                    "SignatureDoesNotMatch"):
            return f"{op}: AWS rejected the credentials ({code}): {message}"
        return f"{op}: {code}: {message}"
    if isinstance(exc, bex.EndpointConnectionError):
        return f"cannot reach the AWS endpoint: {exc}"
    if isinstance(exc, bex.BotoCoreError):
        return " ".join(str(exc).split())
    return str(exc)


@contextlib.contextmanager
def aws_errors(prefix=""):
    """Re-raises botocore exceptions as ``AwsError`` (``prefix`` names the step)."""
    from botocore import exceptions as bex

    try:
        yield
    except (bex.BotoCoreError, bex.ClientError) as exc:
        raise AwsError(f"{prefix}{describe(exc)}") from exc


class Clients:
    """Lazily created boto3 clients sharing one session and endpoint."""

    def __init__(self, settings, session=None):
        import boto3

        self.settings = settings
        self.session = session or boto3.session.Session(region_name=settings.region)
        self._clients = {}
        self._account = None

    def __getattr__(self, service):
        if service.startswith("_") or service in ("settings", "session"):
            raise AttributeError(service)
        if service not in self._clients:
            from botocore.config import Config

            self._clients[service] = self.session.client(
                service.replace("_", "-"), region_name=self.settings.region, endpoint_url=self.settings.endpoint_url,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
        return self._clients[service]

    def account_id(self):
        """The caller's account id; fails with the no-credentials message if there are none."""
        if self._account is None:
            with aws_errors("checking credentials: "):
                self._account = self.sts.get_caller_identity()["Account"]
        return self._account

    def bucket_owner(self):
        """The account every S3 call expects to own the bucket: ``settings.bucket_owner`` or the caller's."""
        return self.settings.bucket_owner or self.account_id()
