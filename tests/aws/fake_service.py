"""A minimal service that follows the ready-file protocol (for agent tests).

``python -m tests.aws.fake_service --port 0 --ready-file F [--fail]`` serves
gRPC health (SERVING) on 127.0.0.1 until SIGTERM; ``--fail`` exits with code 3
before becoming ready, writing a recognisable line to its log.
"""

import argparse
import asyncio
import os
import sys


async def _serve(args):
    from services.common.procs import write_ready_file
    from services.common.server import create_server, run_until_signal

    built = create_server(f"{args.host}:{args.port}", [])
    await built.server.start()
    await built.set_serving(True)
    write_ready_file(args.ready_file, built.port, marker=os.environ.get("PARM_FAKE_MARKER", ""))
    await run_until_signal(built, grace_s=0.5)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", default=None)
    p.add_argument("--fail", action="store_true")
    args = p.parse_args(argv)
    if args.fail:
        print("fake_service: failing on purpose", flush=True)
        return 3
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
