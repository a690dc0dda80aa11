"""The records of a query's life: ``Query``, ``Answer``, ``Batch``, ``Call``, ``Group``.

Plain data, no behaviour beyond trivial predicates; no protobuf messages and
no grpc (the transport serialises a batch itself, see ``instances.py``). The
answer source codes are the proto's ``parm.v1.Source`` enum, imported from
the generated module so that they are defined once (``frontend.proto``).

Who owns what is stated in ``engine.py``; in short, every record is touched
only on the event loop thread.
"""

import enum

import numpy as np

from parm.v1.frontend_pb2 import Source as _ProtoSource

Source = enum.IntEnum("Source", {name: value for name, value in _ProtoSource.items()})
"""Where an answer came from: ``ORIGINAL``, ``RECONSTRUCTED``, ``BACKUP``, ``DEFAULT``
(and ``SOURCE_UNSPECIFIED`` = 0, never given to an answered query)."""

ORIGINAL = Source.ORIGINAL
RECONSTRUCTED = Source.RECONSTRUCTED
BACKUP = Source.BACKUP
DEFAULT = Source.DEFAULT


def source_name(code):
    """"ORIGINAL" etc. for a source code; "NONE" for 0 (no answer)."""
    return Source(code).name if code else "NONE"


class Query:
    """One client query (one example)."""

    __slots__ = ("qid", "request_id", "input", "received_s", "deadline_s",
                 "future", "done", "batch", "row", "source", "answered_s", "deadline_handle",
                 "instance_id", "status", "lateness_wait_s")

    def __init__(self, qid, request_id, array, received_s, deadline_s, future):
        self.qid = qid
        self.request_id = request_id
        self.input = array
        self.received_s = received_s
        self.deadline_s = deadline_s
        self.future = future
        self.done = False
        self.batch = None
        self.row = 0
        self.source = 0
        self.answered_s = None
        self.deadline_handle = None
        self.instance_id = ""
        self.status = ""
        self.lateness_wait_s = None  # a substitute's wait for its original to be late


class Answer:
    """What a query's future resolves to."""

    __slots__ = ("output", "source", "batch_id", "group_id", "latency_ms")

    def __init__(self, output, source, batch_id, group_id, latency_ms):
        self.output = output
        self.source = source
        self.batch_id = batch_id
        self.group_id = group_id
        self.latency_ms = latency_ms


class Batch:
    """A unit of dispatch: data, parity or backup rows for one instance call.

    ``inputs``: ndarray of shape (rows, *input_shape). ``wire`` is the
    transport's cached serialisation of ``inputs`` (opaque to the core; filled
    by the instance client on first use and reused by retries and hedges).
    ``buffer``: the pooled buffer a parity batch's ``inputs`` live in
    (``coding.CodingPools``), owned by the batch until its group finishes;
    None when the kernel allocated them.
    """

    __slots__ = ("batch_id", "group_id", "role", "queries", "inputs", "rows", "group", "index",
                 "queue", "calls", "exclude", "attempts", "output", "created_s", "dispatched_s",
                 "answered_s", "reconstruction", "reconstructed_s", "twin", "hedge_handle",
                 "wire", "closed", "encode_us", "error", "seq", "held", "hold_handle", "buffer")

    def __init__(self, batch_id, role, queries, inputs, created_s):
        self.batch_id = batch_id
        self.group_id = batch_id
        self.role = role
        self.queries = queries
        self.inputs = inputs
        self.rows = len(queries)
        self.group = None
        self.index = 0
        self.queue = None
        self.calls = 0
        self.exclude = set()
        self.attempts = 0
        self.output = None
        self.created_s = created_s
        self.dispatched_s = None
        self.answered_s = None
        self.reconstruction = None
        self.reconstructed_s = None
        self.twin = None
        self.hedge_handle = None
        self.wire = None
        self.closed = False
        self.encode_us = None
        self.error = None       # the last erasure, kept while the batch waits for a decode
        self.seq = 0            # formation order (age); twins and parity take their group's
        self.held = None        # a substitute waiting for this data batch to be late (lateness.py)
        self.hold_handle = None
        self.buffer = None      # pooled inputs (parity), returned when the group finishes

    def needed(self):
        """True while some query of the batch still waits for an answer."""
        for q in self.queries:
            if not q.done:
                return True
        return False


class Coalesced:
    """Several queued batches of one role sent as one instance call (rows concatenated)."""

    __slots__ = ("batches", "inputs", "batch_id", "role", "wire")

    def __init__(self, batches):
        self.batches = batches
        self.inputs = np.concatenate([b.inputs for b in batches])
        self.batch_id = batches[0].batch_id
        self.role = batches[0].role
        self.wire = None


class Call:
    """One outstanding instance call (one batch, or several coalesced); ends exactly once."""

    __slots__ = ("batches", "unit", "instance", "started_s", "timer", "task", "finished", "capped")

    def __init__(self, batches, instance, started_s):
        self.batches = batches
        self.unit = batches[0] if len(batches) == 1 else Coalesced(batches)
        self.instance = instance
        self.started_s = started_s
        self.timer = None
        self.task = None
        self.finished = False
        self.capped = False     # its timeout is its queries' deadline, not the instance timeout


class Group:
    """A coding group: k data batches + one parity batch."""

    __slots__ = ("group_id", "k", "members", "outputs", "n_outputs", "parity", "parity_output",
                 "sealed", "coded", "formed_s", "sealed_s", "timer", "missing", "encode_us", "decode_us",
                 "late", "finished", "encoding", "decoding", "encode_failed", "decode_failed", "decoded",
                 "late_threshold_s", "rec_buffer", "padded", "decoded_s")

    def __init__(self, group_id, k, formed_s):
        self.group_id = group_id
        self.k = k
        self.members = []
        self.outputs = [None] * k
        self.n_outputs = 0
        self.parity = None
        self.parity_output = None
        self.sealed = False
        self.coded = False
        self.formed_s = formed_s    # opened: its first member joined
        self.sealed_s = None        # sealed: k members (the parity can be encoded), or its timer fired
        self.timer = None
        self.missing = None
        self.encode_us = None
        self.decode_us = None
        self.late = None
        self.finished = False
        self.encoding = False
        self.decoding = False
        self.encode_failed = False
        self.decode_failed = False
        self.decoded = None         # the member decoded (its reconstruction may still be held)
        self.decoded_s = None       # when that reconstruction existed
        self.late_threshold_s = None    # the lateness threshold when the group was decoded/sealed
        self.rec_buffer = None      # pooled reconstruction buffer, owned until finish (coding.CodingPools)
        self.padded = False         # sealed partial and coded with zero members in the missing places
