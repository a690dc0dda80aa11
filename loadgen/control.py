"""The control service (``parm.v1.LoadGenerator``) and the runner's client.

Server side: ``Run(spec)`` runs ``loadgen.runner.run_async`` and streams a
``Progress`` event about every 0.2 s, then the records in ``RecordBatch``
events of at most ``RECORDS_PER_EVENT``, then ``RunDone``. ``Stop(run_id)``
ends that run early (an empty ``run_id`` stops every run); the stream still
ends with the records gathered so far and ``RunDone(stopped=true)``. A client
that cancels the ``Run`` stream cancels the run. Errors map to status codes
through the shared interceptor: no frontend -> UNAVAILABLE, no examples or a
bad spec -> INVALID_ARGUMENT, a (run id, client index) already running -> INVALID_ARGUMENT. Runs are
keyed by (run id, client index), so one generator process can serve
several clients of one run.

Client side: ``run_remote(addresses, spec)`` splits ``spec`` (aggregate rate
and counts) over the generators at ``addresses`` (client_index = position),
runs them at once, and returns the merged records with generator 0's run
description (``RunDone.meta_json``: the frontend's GetStatus, the inputs).
"""

import asyncio
import json
import logging
from dataclasses import asdict, dataclass, field, replace

import grpc

from loadgen.client import TargetUnavailable
from loadgen.inputs import InputsError
from loadgen.records import SOURCE_NAMES, SOURCE_VALUES, Record
from loadgen.runner import Spec, run_async
from parm.v1 import loadgen_pb2, loadgen_pb2_grpc
from services.common.errors import InvalidInput, NoInstance
from services.common.server import create_server, open_channel

log = logging.getLogger(__name__)

RECORDS_PER_EVENT = 2000
SERVICE_NAME = loadgen_pb2.DESCRIPTOR.services_by_name["LoadGenerator"].full_name
_SPEC_FIELDS = ("run_id", "target", "rate", "num_queries", "duration_s", "warmup_queries", "seed",
                "deadline_s", "manifest_json", "inputs_path", "client_index")


def spec_to_proto(spec):
    return loadgen_pb2.RunSpec(**{f: getattr(spec, f) for f in _SPEC_FIELDS})


def spec_from_proto(msg):
    return Spec(**{f: getattr(msg, f) for f in _SPEC_FIELDS})


def record_to_proto(r):
    return loadgen_pb2.QueryRecord(
        request_id=r.request_id, send_time_s=r.send_time_s, latency_ms=r.latency_ms,
        status=r.status, source=SOURCE_VALUES.get(r.source, 0), predicted=r.predicted,
        label=r.label, warmup=r.warmup, send_lag_ms=r.send_lag_ms, client_index=r.client_index,
        batch_id=r.batch_id, group_id=r.group_id, frontend_latency_ms=r.frontend_latency_ms,
    )


def record_from_proto(m):
    return Record(
        request_id=m.request_id, client_index=m.client_index, send_time_s=m.send_time_s,
        send_lag_ms=m.send_lag_ms, latency_ms=m.latency_ms, status=m.status,
        source=SOURCE_NAMES.get(m.source, "") if m.status == "OK" else "",
        predicted=m.predicted, label=m.label, warmup=m.warmup, batch_id=m.batch_id,
        group_id=m.group_id, frontend_latency_ms=m.frontend_latency_ms,
    )


def _progress(counters):
    return loadgen_pb2.RunEvent(progress=loadgen_pb2.Progress(
        sent=counters.sent, completed=counters.completed, errors=counters.errors,
        total=counters.total))


class LoadGeneratorServicer(loadgen_pb2_grpc.LoadGeneratorServicer):
    def __init__(self, progress_interval_s=0.2):
        self._runs = {}
        self._progress_interval_s = progress_interval_s

    async def Run(self, request, context):
        try:
            spec = spec_from_proto(request).validate()
        except ValueError as exc:
            raise InvalidInput(f"bad run spec: {exc}") from None
        key = (spec.run_id, spec.client_index)
        if key in self._runs:
            raise InvalidInput(f"run {spec.run_id!r} (client {spec.client_index}) is already running")
        stop = asyncio.Event()
        self._runs[key] = stop
        queue = asyncio.Queue()
        task = asyncio.create_task(run_async(
            spec, stop=stop, on_progress=lambda c: queue.put_nowait(_progress(c)),
            progress_interval_s=self._progress_interval_s))
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            try:
                result = task.result()
            except TargetUnavailable as exc:
                raise NoInstance(str(exc)) from None
            except (InputsError, ValueError) as exc:
                raise InvalidInput(str(exc)) from None
            for start in range(0, len(result.records), RECORDS_PER_EVENT):
                chunk = result.records[start:start + RECORDS_PER_EVENT]
                yield loadgen_pb2.RunEvent(records=loadgen_pb2.RecordBatch(
                    records=[record_to_proto(r) for r in chunk]))
            yield loadgen_pb2.RunEvent(done=loadgen_pb2.RunDone(
                run_id=spec.run_id, stopped=result.stopped, meta_json=json.dumps(result.meta)))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._runs.pop(key, None)

    async def Stop(self, request, context):
        targets = [event for (run_id, _), event in self._runs.items()
                   if not request.run_id or run_id == request.run_id]
        for event in targets:
            event.set()
        return loadgen_pb2.StopResponse(stopped=bool(targets))


def build_server(address="127.0.0.1:0", **servicer_kwargs):
    """Builds (does not start) the control server. Returns ``BuiltServer``."""
    servicer = LoadGeneratorServicer(**servicer_kwargs)
    # No SO_REUSEPORT: a second generator on a taken port must fail, not
    # share the port and split the runner's calls between processes.
    return create_server(address, [(loadgen_pb2_grpc.add_LoadGeneratorServicer_to_server,
                                    servicer, SERVICE_NAME)],
                         extra_options=[("grpc.so_reuseport", 0)])


# ---------------------------------------------------------------------------
# Runner side
# ---------------------------------------------------------------------------

class RemoteRunError(RuntimeError):
    """A generator failed; names its address and the status."""


@dataclass
class RemoteResult:
    records: list
    stopped: bool = False
    per_generator: list = field(default_factory=list)  # dicts: address, num_records, stopped
    # Generator 0's run description (the frontend's GetStatus, inputs) with
    # the aggregate spec; per-generator start times are in per_generator.
    meta: dict = field(default_factory=dict)


async def _drive(address, spec, on_progress):
    channel = open_channel(address)
    records, stopped, meta = [], False, {}
    try:
        stub = loadgen_pb2_grpc.LoadGeneratorStub(channel)
        async for event in stub.Run(spec_to_proto(spec)):
            kind = event.WhichOneof("event")
            if kind == "progress" and on_progress is not None:
                on_progress(spec.client_index, event.progress)
            elif kind == "records":
                records.extend(record_from_proto(m) for m in event.records.records)
            elif kind == "done":
                stopped = event.done.stopped
                meta = json.loads(event.done.meta_json) if event.done.meta_json else {}
    except grpc.aio.AioRpcError as exc:
        raise RemoteRunError(f"load generator {address}: {exc.code().name}: {exc.details()}") from None
    finally:
        await channel.close()
    return {"address": address, "records": records, "stopped": stopped, "meta": meta}


async def stop_remote(addresses, run_id="", timeout_s=5.0):
    """Sends ``Stop(run_id)`` to every generator; returns how many stopped one."""
    async def one(address):
        channel = open_channel(address)
        try:
            stub = loadgen_pb2_grpc.LoadGeneratorStub(channel)
            reply = await stub.Stop(loadgen_pb2.StopRequest(run_id=run_id), timeout=timeout_s)
            return reply.stopped
        except grpc.aio.AioRpcError:
            return False
        finally:
            await channel.close()
    return sum(await asyncio.gather(*(one(a) for a in addresses)))


async def run_remote_async(addresses, spec, *, on_progress=None):
    """Runs ``spec`` split over the generators at ``addresses``; merges.

    Args:
        addresses: list of "host:port" of ``python -m loadgen serve``.
        spec: ``loadgen.Spec`` with aggregate ``rate``/``num_queries``/
            ``warmup_queries``; generator i gets ``spec.split(n)[i]``.
        on_progress: optional ``callable(client_index, parm.v1.Progress)``.

    Returns:
        ``RemoteResult``: records of all generators, sorted by
        (client_index, send_time_s).

    Raises:
        RemoteRunError: a generator failed (the others are stopped).
    """
    addresses = list(addresses)
    if not addresses:
        raise ValueError("no load generator addresses")
    spec.validate()
    if 0 < spec.num_queries < len(addresses):
        raise ValueError(f"num_queries {spec.num_queries} is fewer than the {len(addresses)} generators")
    tasks = [asyncio.create_task(_drive(a, s, on_progress))
             for a, s in zip(addresses, spec.split(len(addresses)))]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    records = sorted((r for res in results for r in res["records"]),
                     key=lambda r: (r.client_index, r.send_time_s))
    meta = dict(results[0]["meta"])
    meta["spec"] = asdict(replace(spec, manifest_json=""))
    meta.pop("started_unix_s", None)
    meta.pop("finished_unix_s", None)
    return RemoteResult(
        records=records,
        stopped=any(res["stopped"] for res in results),
        per_generator=[{"address": res["address"], "num_records": len(res["records"]),
                        "stopped": res["stopped"],
                        "started_unix_s": res["meta"].get("started_unix_s"),
                        "finished_unix_s": res["meta"].get("finished_unix_s")} for res in results],
        meta=meta,
    )


def run_remote(addresses, spec, **kwargs):
    """Synchronous ``run_remote_async``."""
    return asyncio.run(run_remote_async(addresses, spec, **kwargs))
