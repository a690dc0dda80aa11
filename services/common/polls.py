"""Waiting for a gRPC service to come up: the one poll loop.

``poll_until(probe, timeout_s)`` awaits ``probe()`` every ``period_s`` until
it returns something other than None, and returns that. Only "not up yet"
is retried: an ``AioRpcError`` with ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED``
(nothing listening yet, a server still starting, a slow first answer).
Everything else propagates at once with its real error: a protocol mismatch
(``UNIMPLEMENTED``: the address serves another service), a TLS mismatch, a
bug. gRPC reports a failed TLS handshake as ``UNAVAILABLE``; its details
name the handshake, and ``not_up_yet`` treats it as the error it is.

When the time is up, ``PollTimeout`` carries the last "not up yet" error, so
the message says what the service answered, not only that it did not.
"""

import grpc

from services.common.clock import REAL as REAL_CLOCK

__all__ = ["NOT_UP_YET", "PollTimeout", "not_up_yet", "poll_until", "status_not_up_yet"]

NOT_UP_YET = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Substrings of an UNAVAILABLE's details that mean "the TLS handshake failed"
# (gRPC core: "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...",
# "Handshake failed", certificate verification errors).
_HANDSHAKE_FAILED = ("handshake failed", "ssl_error", "tsi_", "certificate verify failed")


class PollTimeout(TimeoutError):
    """The probe did not succeed in time; ``last_error`` is the last "not up yet" error (or None)."""

    def __init__(self, message, last_error=None):
        super().__init__(message)
        self.last_error = last_error


def status_not_up_yet(code, details):
    """Whether a call that failed with status ``code`` and ``details`` means "not up yet"
    (for any client: aio, sync, or an error that carries the two)."""
    if code not in NOT_UP_YET:
        return False
    details = (details or "").lower()
    return not any(marker in details for marker in _HANDSHAKE_FAILED)


def not_up_yet(exc):
    """Whether ``exc`` means "the service is not up yet" (retry) rather than a real error."""
    return isinstance(exc, grpc.aio.AioRpcError) and status_not_up_yet(exc.code(), exc.details())


def describe(exc):
    """``CODE: details`` of an RPC error, one line."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {' '.join((exc.details() or '').split())}"
    return f"{type(exc).__name__}: {exc}"


async def poll_until(probe, timeout_s, *, period_s=0.2, what="the service", clock=None):
    """Awaits ``probe()`` until it returns non-None (returned), retrying "not up yet".

    Args:
        probe: ``async () -> value or None``; None means "not yet" too.
        timeout_s: how long to keep trying.
        period_s: pause between tries.
        what: named in the timeout's message.
        clock: ``services.common.clock.Clock`` (default the real one).

    Raises:
        PollTimeout: ``timeout_s`` passed.
        grpc.aio.AioRpcError: any error that is not "not up yet", at once.
    """
    clock = clock or REAL_CLOCK
    deadline = clock.now() + timeout_s
    last = None
    while True:
        try:
            value = await probe()
        except grpc.aio.AioRpcError as exc:
            if not not_up_yet(exc):
                raise
            last = exc
        else:
            if value is not None:
                return value
        if clock.now() >= deadline:
            tail = f"; last answer {describe(last)}" if last is not None else ""
            raise PollTimeout(f"{what} not ready after {timeout_s:g} s{tail}", last)
        await clock.sleep(period_s)
