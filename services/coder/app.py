"""``python -m services.coder``: the encoder/decoder as a gRPC service.

``build_server(cfg)`` returns a ``CoderApp`` (built, not started: ``.server``,
``.port``); ``serve(cfg)`` starts it, flips health to SERVING, writes the
ready file and serves until SIGTERM.
"""

from dataclasses import dataclass

from parm.v1 import coder_pb2_grpc as pb_grpc
from services.common import cli
from services.common import tls as tls_mod
from services.common.procs import write_ready_file
from services.common.server import MAX_MESSAGE_BYTES, create_server, run_until_signal, setup_logging
from services.coder.core import CoderCore, load_kernels
from services.coder.servicer import SERVICE_NAME, CoderServicer


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 0
    ready_file: str | None = None
    kernels: str = "native"
    executor_workers: int = 1
    max_message_bytes: int = MAX_MESSAGE_BYTES
    grace_s: float = 2.0
    log_level: str = "INFO"
    tls: tls_mod.TlsConfig = tls_mod.PLAINTEXT


PROG = "python -m services.coder"


def parse_config(argv):
    """``Config`` from the command line; raises ``UsageError`` (one line) on a mistake."""
    p = cli.ArgumentParser(prog=PROG, description="ParM encoder/decoder service.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=cli.PORT, default=0, help="port to bind (0 = a free port)")
    p.add_argument("--ready-file", default=None, help="write {port, pid} JSON here once serving")
    p.add_argument("--kernels", choices=("native", "reference"), default="native",
                   help="coding_ext (Cython) or coding_ext.reference (numpy)")
    p.add_argument("--executor-workers", type=cli.number(int, at_least=1), default=1, help="kernel threads")
    p.add_argument("--max-message-bytes", type=cli.number(int, at_least=1024), default=MAX_MESSAGE_BYTES,
                   help="gRPC message limit, bytes")
    p.add_argument("--grace-s", type=cli.number(at_least=0), default=2.0, help="graceful shutdown grace period, s")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    tls_mod.add_arguments(p)
    a = p.parse_args(argv)
    return Config(a.host, a.port, a.ready_file, a.kernels, a.executor_workers, a.max_message_bytes,
                  a.grace_s, a.log_level, tls_mod.from_args(a))


class CoderApp:
    def __init__(self, cfg, kernels=None):
        self.cfg = cfg
        self.core = CoderCore(kernels or load_kernels(cfg.kernels), workers=cfg.executor_workers)
        self.built = create_server(
            f"{cfg.host}:{cfg.port}",
            [(pb_grpc.add_CoderServicer_to_server, CoderServicer(self.core), SERVICE_NAME)],
            max_message_bytes=cfg.max_message_bytes, tls=cfg.tls,
        )
        self.server = self.built.server
        self.port = self.built.port

    async def start(self):
        await self.server.start()
        await self.built.set_serving(True)

    async def shutdown(self):
        self.core.close()

    async def run(self):
        await self.start()
        print(f"coder on {self.cfg.host}:{self.port} kernels={self.core.kernels.module}", flush=True)
        write_ready_file(self.cfg.ready_file, self.port, kernels=self.core.kernels.module)
        await run_until_signal(self.built, grace_s=self.cfg.grace_s, on_shutdown=self.shutdown)


def build_server(cfg, kernels=None):
    return CoderApp(cfg, kernels)


async def serve(cfg):
    await build_server(cfg).run()


def _main(argv):
    cfg = parse_config(argv)
    setup_logging(cfg.log_level)
    cli.run_async(serve(cfg))


def main(argv=None):
    return cli.run_main(_main, argv, prog=PROG, runtime_errors=(ImportError, OSError))
