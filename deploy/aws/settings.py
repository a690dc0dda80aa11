"""``AwsSettings``: the AWS side of a launch, from flags, then env, then defaults.

Config files stay as they are (they name instance types only); everything
about *where* and *how* a fleet runs is here. Each flag has an environment
variable (``PARM_AWS_*``) so that a shell or CI can set it once.
"""

import ipaddress
import os
from dataclasses import dataclass

# Public SSM parameters that always point at a current image (no hard-coded AMI ids).
UBUNTU_AMI_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
GPU_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
DEFAULT_REGION = "us-east-1"
DEFAULT_AGENT_PORT = 7070
DEFAULT_REDIS_PORT = 6379
DEFAULT_RUNNER_COMMAND = (
    "{python} -m deploy.runner.local {config} --agents {hosts} --out {out} --artifacts {artifacts} --no-build --no-progress"
)
MARKETS = ("on-demand", "spot")


class SettingsError(ValueError):
    """A setting that cannot work (one line, exit 2)."""


@dataclass(frozen=True)
class AwsSettings:
    region: str = DEFAULT_REGION
    endpoint_url: str | None = None
    availability_zones: tuple = ()      # () = every zone of the region offering the fleet's types
    subnet_ids: tuple = ()              # () = the default VPC's default subnets in those zones
    key_name: str | None = None         # None: no key pair (no SSH login)
    ssh_cidr: str = "auto"              # "auto": the caller's public address /32; "none": no SSH rule
    ami: str | None = None              # overrides the SSM lookup for every role
    ami_parameter_cpu: str = UBUNTU_AMI_PARAMETER
    ami_parameter_gpu: str = GPU_AMI_PARAMETER
    market: str = "on-demand"
    spot_discount: float = 0.65         # estimate only: spot ~ 35% of on-demand
    bucket: str | None = None           # None: parm-<account>-<region>
    bucket_owner: str | None = None     # expected owner of the bucket (None: the caller's account)
    frontend_type: str | None = None    # overrides the config's instance types
    worker_type: str | None = None
    client_type: str | None = None
    agent_port: int = DEFAULT_AGENT_PORT
    redis_port: int = DEFAULT_REDIS_PORT
    volume_size_gb: int = 64
    run_overhead_s: float = 60.0        # per run: start instances, warm up, drain
    runner_command: str = DEFAULT_RUNNER_COMMAND

    @property
    def spot(self):
        return self.market == "spot"


def _env_tuple(value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def add_arguments(parser):
    """Adds the settings flags (each defaulting from its env variable) to ``parser``."""
    g = parser.add_argument_group("AWS settings (flag, else env PARM_AWS_*, else default)")
    g.add_argument("--region", default=None,
                   help=f"region (env PARM_AWS_REGION, AWS_REGION, AWS_DEFAULT_REGION; default {DEFAULT_REGION})")
    g.add_argument("--endpoint-url", default=None,
                   help="send every AWS call here, e.g. a local moto server (env PARM_AWS_ENDPOINT_URL)")
    g.add_argument("--availability-zones", default=None,
                   help="comma-separated zones to try in order (env PARM_AWS_AZS; default: all that offer the types)")
    g.add_argument("--subnet-ids", default=None,
                   help="comma-separated subnets, tried in order (env PARM_AWS_SUBNET_IDS; default: default VPC)")
    g.add_argument("--key-name", default=None, help="EC2 key pair for SSH (env PARM_AWS_KEY_NAME; default none)")
    g.add_argument("--ssh-cidr", default=None,
                   help="address allowed to SSH, only with --key-name: one address as a /32 (or /128) CIDR, "
                        "'auto' (your public address/32) or 'none' (env PARM_AWS_SSH_CIDR; default auto)")
    g.add_argument("--ami", default=None, help="AMI id for every role (env PARM_AWS_AMI; default: SSM lookup)")
    g.add_argument("--ami-ssm-cpu", default=None,
                   help=f"SSM parameter of the CPU image (env PARM_AWS_AMI_SSM_CPU; default {UBUNTU_AMI_PARAMETER})")
    g.add_argument("--ami-ssm-gpu", default=None,
                   help=f"SSM parameter of the GPU image (env PARM_AWS_AMI_SSM_GPU; default {GPU_AMI_PARAMETER})")
    g.add_argument("--market", default=None, choices=MARKETS,
                   help="spot or on-demand (env PARM_AWS_MARKET; default on-demand)")
    g.add_argument("--spot-discount", type=float, default=None,
                   help="estimated spot discount off on-demand, 0..1, for the cost estimate (default 0.65)")
    g.add_argument("--bucket", default=None, help="S3 bucket (env PARM_AWS_BUCKET; default parm-ACCOUNT-REGION)")
    g.add_argument("--frontend-type", default=None, help="override the config's frontend_type")
    g.add_argument("--worker-type", default=None, help="override the config's worker_type")
    g.add_argument("--client-type", default=None, help="override the config's client_type")
    g.add_argument("--agent-port", type=int, default=None, help=f"node agent port (default {DEFAULT_AGENT_PORT})")
    g.add_argument("--volume-size-gb", type=int, default=None, help="root volume size, GB (default 64)")
    g.add_argument("--run-overhead-s", type=float, default=None,
                   help="per-run overhead for the duration estimate, s (default 60)")
    g.add_argument("--runner-command", default=None,
                   help="sweep command run on the frontend node; placeholders {python} {config} {hosts} {out} {artifacts} "
                        f"(default {DEFAULT_RUNNER_COMMAND!r})")


def check_ssh_cidr(value):
    """``value`` if it names one host (a /32 or /128 network), else ``SettingsError``."""
    if value in ("auto", "none"):
        return value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise SettingsError(f"--ssh-cidr: {value!r} is not a CIDR like 203.0.113.7/32, 'auto' or 'none'") from None
    if net.prefixlen != net.max_prefixlen or "/" not in value:
        raise SettingsError(f"--ssh-cidr: {value} is wider than one address; give a /{net.max_prefixlen} "
                            f"(e.g. {net.network_address}/{net.max_prefixlen})")
    return str(net)


def from_args(args, env=None):
    """``AwsSettings`` from parsed flags, falling back to ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env

    def pick(flag, *names, default=None):
        if flag is not None:
            return flag
        for name in names:
            if env.get(name):
                return env[name]
        return default

    market = pick(args.market, "PARM_AWS_MARKET", default="on-demand")
    if market not in MARKETS:
        raise SettingsError(f"market {market!r} is not one of {', '.join(MARKETS)}")
    ssh_cidr = check_ssh_cidr(pick(args.ssh_cidr, "PARM_AWS_SSH_CIDR", default="auto"))
    discount = args.spot_discount if args.spot_discount is not None else float(env.get("PARM_AWS_SPOT_DISCOUNT", 0.65))
    if not 0 <= discount < 1:
        raise SettingsError(f"--spot-discount: {discount} is not within [0, 1)")
    agent_port = args.agent_port if args.agent_port is not None else DEFAULT_AGENT_PORT
    if not 1 <= agent_port < 65536:
        raise SettingsError(f"--agent-port: {agent_port} is not a port number")
    volume = args.volume_size_gb if args.volume_size_gb is not None else 64
    if volume < 8:
        raise SettingsError(f"--volume-size-gb: {volume} is below 8")
    return AwsSettings(
        region=pick(args.region, "PARM_AWS_REGION", "AWS_REGION", "AWS_DEFAULT_REGION", default=DEFAULT_REGION),
        endpoint_url=pick(args.endpoint_url, "PARM_AWS_ENDPOINT_URL"),
        availability_zones=_env_tuple(pick(args.availability_zones, "PARM_AWS_AZS")),
        subnet_ids=_env_tuple(pick(args.subnet_ids, "PARM_AWS_SUBNET_IDS")),
        key_name=pick(args.key_name, "PARM_AWS_KEY_NAME"),
        ssh_cidr=ssh_cidr,
        ami=pick(args.ami, "PARM_AWS_AMI"),
        ami_parameter_cpu=pick(args.ami_ssm_cpu, "PARM_AWS_AMI_SSM_CPU", default=UBUNTU_AMI_PARAMETER),
        ami_parameter_gpu=pick(args.ami_ssm_gpu, "PARM_AWS_AMI_SSM_GPU", default=GPU_AMI_PARAMETER),
        market=market,
        spot_discount=discount,
        bucket=pick(args.bucket, "PARM_AWS_BUCKET"),
        frontend_type=args.frontend_type,
        worker_type=args.worker_type,
        client_type=args.client_type,
        agent_port=agent_port,
        volume_size_gb=volume,
        run_overhead_s=args.run_overhead_s if args.run_overhead_s is not None else 60.0,
        runner_command=args.runner_command or DEFAULT_RUNNER_COMMAND,
    )
