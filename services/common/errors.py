"""Domain exceptions and the one interceptor that maps them to gRPC status.

Servicers never catch exceptions themselves: they raise these, and
``ErrorMappingInterceptor`` turns them into a status code with the message.

| exception | status |
|---|---|
| ``InvalidInput`` | INVALID_ARGUMENT |
| ``NoInstance`` | UNAVAILABLE |
| ``Overloaded`` | RESOURCE_EXHAUSTED |
| ``DeadlineExceeded`` / ``asyncio.TimeoutError`` | DEADLINE_EXCEEDED |
| ``InstanceFailed`` | UNAVAILABLE |
| ``NotFound`` | NOT_FOUND |
| request bytes that do not parse | INVALID_ARGUMENT |
| anything else | INTERNAL, generic message, traceback in the log |
"""

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)


class ParmError(Exception):
    """Base of the domain exceptions; carries the status code to answer with."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ParmError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NoInstance(ParmError):
    code = grpc.StatusCode.UNAVAILABLE


class InstanceFailed(ParmError):
    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ParmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ParmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ParmError):
    code = grpc.StatusCode.NOT_FOUND


def status_for(exc):
    """(code, message) to answer for an exception raised by a servicer."""
    if isinstance(exc, ParmError):
        return exc.code, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


def _parse(deserializer, raw, method):
    """Deserializes a request here rather than in gRPC, so that bytes that are
    not the method's message get INVALID_ARGUMENT (gRPC itself answers UNKNOWN)."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception:  # noqa: BLE001 - DecodeError and friends
        raise InvalidInput(f"malformed request: {len(raw)} bytes that do not parse as the "
                           f"request message of {method}") from None


def _wrap_unary(behavior, method, deserializer=None):
    async def wrapper(request, context):
        try:
            return await behavior(_parse(deserializer, request, method), context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one mapping point
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
            await context.abort(code, message)

    return wrapper


def _wrap_stream(behavior, method, deserializer=None):
    async def wrapper(request, context):
        try:
            async for item in behavior(_parse(deserializer, request, method), context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one mapping point
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
            await context.abort(code, message)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain exceptions raised by async handlers to status codes."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler
