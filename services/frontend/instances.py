"""Model instances as the frontend sees them: state, and the client interface.

``InstanceClient`` hides the transport: ``GrpcInstanceClient`` calls a
``parm.v1.ModelServer``; the unit tests use hand-written fakes with the same
method. ``Instance`` is the frontend's bookkeeping for one instance; it is
touched only on the event loop thread.

Health: a failed or timed-out call marks the instance down for a backoff
(``down_until_s``, doubling per consecutive failure from ``BASE_BACKOFF_S`` up
to ``MAX_BACKOFF_S``); a success clears it. A down instance is given no work
(the engine re-pumps its queue when the backoff ends), so a killed instance
costs one failed call per backoff period, not one per batch.
"""

import abc

import numpy as np

from parm.v1 import model_server_pb2, model_server_pb2_grpc
from services.common import tensors
from services.common.errors import InstanceFailed
from services.common.server import open_channel

BASE_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


class InstanceClient(abc.ABC):
    """Transport to one model instance."""

    @abc.abstractmethod
    async def infer(self, batch, timeout_s):
        """Runs ``batch`` (``records.Batch`` or ``records.Coalesced``: ``inputs``
        ndarray of shape (B, *input_shape), ``batch_id``, ``wire``).

        Returns:
            ndarray of shape (B, *output_shape).
        Raises:
            Any exception: the call failed (an erasure for the engine).
        """

    @classmethod
    def prepare(cls, batch):
        """Serialises ``batch`` ahead of its first call (default: nothing to do)."""

    async def close(self):
        """Releases the transport."""


class GrpcInstanceClient(InstanceClient):
    """``parm.v1.ModelServer.Infer`` over one aio channel.

    The batch's ``Tensor`` is built once, through ``services.common.tensors``
    (little-endian, C order), cached in ``batch.wire`` and reused by retries,
    hedges and the backup twin.
    """

    def __init__(self, address):
        self.address = address
        self._channel = open_channel(address)
        self._infer = model_server_pb2_grpc.ModelServerStub(self._channel).Infer

    @classmethod
    def prepare(cls, batch):
        if batch.wire is None:
            batch.wire = tensors.to_proto(batch.inputs)
        return batch.wire

    async def infer(self, batch, timeout_s):
        reply = await self._infer(
            model_server_pb2.InferRequest(input=self.prepare(batch), batch_id=batch.batch_id),
            timeout=timeout_s,
        )
        try:
            return tensors.from_proto(reply.output, "instance output")
        except ValueError as exc:
            raise InstanceFailed(f"{self.address}: {exc}") from None

    async def close(self):
        await self._channel.close(grace=None)


class Instance:
    """Bookkeeping for one instance (event loop thread only)."""

    __slots__ = ("instance_id", "address", "role", "model", "client", "in_flight",
                 "completed", "errors", "timeouts", "failures_in_row", "down_until_s",
                 "removed", "calls", "clock")

    def __init__(self, instance_id, address, role, client, clock, model=""):
        self.instance_id = instance_id
        self.address = address
        self.role = role
        self.model = model
        self.client = client
        self.clock = clock
        self.in_flight = 0
        self.completed = 0
        self.errors = 0
        self.timeouts = 0
        self.failures_in_row = 0
        self.down_until_s = 0.0
        self.removed = False
        self.calls = set()

    @property
    def usable(self):
        return not self.removed and self.clock.now() >= self.down_until_s

    def mark_failed(self):
        """Records a failure; returns the backoff (s) the instance is now down for."""
        self.failures_in_row += 1
        backoff = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (self.failures_in_row - 1))
        self.down_until_s = self.clock.now() + backoff
        return backoff

    def mark_ok(self):
        self.failures_in_row = 0
        self.down_until_s = 0.0


def parse_static_instances(spec):
    """Parses ``role=host:port,role=host:port`` into [(role, address)].

    Raises:
        ValueError: naming the bad entry.
    """
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        role, sep, address = part.partition("=")
        if not sep or role not in ("data", "parity", "backup"):
            raise ValueError(f"--instances entry {part!r}: expected role=host:port with role data|parity|backup")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--instances entry {part!r}: address {address!r} is not host:port")
        out.append((role, address))
    return out


def check_rows(output, batch_rows, output_shape, where):
    """Checks an instance's output against (B, *output_shape)."""
    if not isinstance(output, np.ndarray) or output.shape != (batch_rows, *output_shape):
        shape = getattr(output, "shape", None)
        raise InstanceFailed(
            f"{where}: output shape {list(shape) if shape is not None else shape}, "
            f"expected {[batch_rows, *output_shape]}")
