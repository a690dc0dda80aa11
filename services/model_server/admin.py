"""Run-time control of a model server.

    python -m services.model_server.admin ADDRESS info
    python -m services.model_server.admin ADDRESS clear
    python -m services.model_server.admin ADDRESS set [--delay-dist KIND --delay-params K=V,...]
        [--delay-seed N] [--stall-probability P --stall-ms MS] [--fail-probability P]
        [--hang] [--stop] [--duration-s S]

Prints the reply as JSON. Flag mistakes: one line on stderr, exit 2; RPC errors: one line, exit 1.
"""

import json
import sys

import grpc
from google.protobuf import json_format

from parm.v1 import model_server_pb2 as pb
from parm.v1 import model_server_pb2_grpc as pb_grpc
from services.common import cli
from services.common.cli import UsageError
from services.common.server import open_channel
from services.model_server.distributions import PARAMS, parse_params

PROG = "python -m services.model_server.admin"


def parse_args(argv):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("address", help="host:port of the model server")
    p.add_argument("--timeout-s", type=float, default=5.0, help="RPC timeout, s")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="GetInfo")
    sub.add_parser("clear", help="clear the perturbation")
    s = sub.add_parser("set", help="set a perturbation (replaces the current one)")
    s.add_argument("--delay-dist", choices=sorted(PARAMS), default="none", help="extra delay distribution")
    s.add_argument("--delay-params", default="", help="NAME=VALUE,... (ms; sigma unitless)")
    s.add_argument("--delay-seed", type=int, default=0, help="seed (0 = derived from the instance seed)")
    s.add_argument("--stall-probability", type=float, default=0.0, help="probability of a stall per request")
    s.add_argument("--stall-ms", type=float, default=0.0, help="stall length, ms")
    s.add_argument("--fail-probability", type=float, default=0.0, help="probability of answering UNAVAILABLE")
    s.add_argument("--hang", action="store_true", help="accept requests, never answer")
    s.add_argument("--stop", action="store_true", help="kill the server process at once")
    s.add_argument("--duration-s", type=float, default=0.0, help="auto-clear after this many s (0 = never)")
    return p.parse_args(argv)


def build_request(args):
    if args.command == "clear":
        return pb.SetPerturbationRequest(clear=True)
    try:
        params = parse_params(args.delay_params)
    except ValueError as exc:
        raise UsageError(f"--delay-params: {exc}") from None
    return pb.SetPerturbationRequest(perturbation=pb.Perturbation(
        delay=pb.Distribution(kind=args.delay_dist, params=params, seed=args.delay_seed),
        stall_probability=args.stall_probability, stall_ms=args.stall_ms,
        fail_probability=args.fail_probability, hang=args.hang, stop=args.stop,
        duration_s=args.duration_s,
    ))


async def run(args):
    """Sends the command; an RPC error becomes ``cli.Failure`` (CODE: details)."""
    request = None if args.command == "info" else build_request(args)
    async with open_channel(args.address) as channel:
        stub = pb_grpc.ModelServerStub(channel)
        try:
            if request is None:
                reply = await stub.GetInfo(pb.GetInfoRequest(), timeout=args.timeout_s)
            else:
                reply = await stub.SetPerturbation(request, timeout=args.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise cli.Failure(f"{exc.code().name}: {exc.details()}") from None
    return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)


def _main(argv):
    result = cli.run_async(run(parse_args(argv)))
    print(json.dumps(result, indent=2, sort_keys=True))


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
