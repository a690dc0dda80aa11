"""Building and running a grpc.aio server: health, reflection, limits, shutdown.

A server is *built* (``create_server``) separately from being *run*
(``run_until_signal``), so tests bind port 0 and read the real port back.
Message size limits are explicit on every server and channel
(``MAX_MESSAGE_BYTES`` unless a service says otherwise); larger messages are
rejected by gRPC with RESOURCE_EXHAUSTED.
"""

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import tls as tls_mod
from services.common.cli import setup_logging  # noqa: F401 - re-exported for the services
from services.common.errors import ErrorMappingInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def grpc_options(max_message_bytes=MAX_MESSAGE_BYTES):
    """Channel/server options with explicit message size limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# A channel whose server went away retries the connection with exponential
# backoff; gRPC's default cap (120 s, first retry after 1 s) keeps a client
# failing with UNAVAILABLE long after a restarted server is back. Capped at 1 s.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def balancing_options(address):
    """Round robin over every address a ``dns:`` target resolves to (a headless
    Kubernetes Service: one connection per pod, requests spread across them);
    other targets keep gRPC's default (one address, ``pick_first``)."""
    return [("grpc.lb_policy_name", "round_robin")] if str(address).startswith("dns:") else []


def insecure_channel(address, max_message_bytes=MAX_MESSAGE_BYTES):
    """An aio channel to ``address`` with the project's explicit limits."""
    return grpc.aio.insecure_channel(address, options=grpc_options(max_message_bytes) + RECONNECT_OPTIONS
                                     + balancing_options(address))


def open_channel(address, max_message_bytes=MAX_MESSAGE_BYTES, *, tls=None):
    """An aio channel to ``address``: TLS when ``tls`` (default: the installed
    ``services.common.tls`` config) has a CA, plaintext otherwise."""
    tls = tls if tls is not None else tls_mod.current()
    if tls.client_enabled:
        return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                       options=grpc_options(max_message_bytes) + RECONNECT_OPTIONS
                                       + balancing_options(address) + tls.channel_options())
    return insecure_channel(address, max_message_bytes)


@dataclass
class BuiltServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple

    async def set_serving(self, serving):
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("",) + self.service_names:
            await self.health.set(name, status)


def create_server(
    address,
    services,
    *,
    max_message_bytes=MAX_MESSAGE_BYTES,
    interceptors=(),
    extra_options=(),
    tls=None,
):
    """Builds (does not start) an aio server with health and reflection.

    Args:
        address: "host:port"; port 0 picks a free port.
        services: list of (add_servicer_fn, servicer, full_service_name).
        max_message_bytes: explicit send/receive limit.
        interceptors: extra interceptors, run after the error mapping one.
        tls: ``TlsConfig``; default the installed one (plaintext unless set).

    Returns:
        BuiltServer; health starts NOT_SERVING for every service name.
    """
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), *interceptors],
        options=grpc_options(max_message_bytes) + list(extra_options),
    )
    names = []
    for add_fn, servicer, name in services:
        add_fn(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME],
        server,
    )
    tls = tls if tls is not None else tls_mod.current()
    if tls.server_enabled:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    log.info("gRPC on %s port %d: %s%s", address.rsplit(":", 1)[0], port, tls.describe(),
             "" if tls.server_enabled else " (no TLS; --tls-cert/--tls-key enable it)")
    return BuiltServer(server, port, health_servicer, tuple(names))


async def run_until_signal(built, *, grace_s=5.0, on_shutdown=None):
    """Serves until SIGTERM/SIGINT, then shuts down gracefully.

    Order: health NOT_SERVING -> ``server.stop(grace_s)`` -> ``on_shutdown()``
    (close channels, deregister from the registry).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
        await built.set_serving(False)
        await built.server.stop(grace_s)
    finally:
        if on_shutdown is not None:
            await on_shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
