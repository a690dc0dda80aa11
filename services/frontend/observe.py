"""Observability: Prometheus metrics and the per-query / per-group records.

``Metrics`` owns a private ``CollectorRegistry`` (no module globals). Latency
histograms are observed on the hot path; gauges and counters are read from
the engine at scrape time by a custom collector, so they cost nothing per
query. ``Records`` appends JSON lines to ``queries.jsonl`` and
``groups.jsonl`` in the records directory (format in docs/frontend.md);
lines are buffered (64 KiB) and flushed when the buffer fills, every second (the app
schedules ``flush()``) and at close.

Names keep the original's where they fit: ``E2E_LATENCY`` ->
``parm_frontend_e2e_latency_seconds``, ``QUEUE_LATENCY`` ->
``parm_frontend_queue_latency_seconds``, ``ENCODING_LATENCY`` /
``DECODING_LATENCY`` -> ``parm_frontend_encoding_latency_seconds`` /
``parm_frontend_decoding_latency_seconds``; in the records the same names
appear as ``e2e_latency_ms``, ``queue_latency_ms``, ``encoding_latency_us``
and ``decoding_latency_us``.
"""

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import pathlib
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.common.cpustat import parse_psi_some
from services.frontend.engine import NullObserver
from services.frontend.records import Source, source_name

log = logging.getLogger(__name__)

_LAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_CODE_BUCKETS = (1e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 0.1)


def _at(t, offset):
    """A monotonic time as a Unix time (None stays None)."""
    return None if t is None else t + offset


class _EngineCollector:
    """Gauges and counters of the engine, from ``engine.snapshot()`` taken on the loop.

    The HTTP server runs in its own thread while the event loop mutates the
    engine (queues, dicts); iterating them from that thread raced ("deque
    mutated during iteration"). So a scrape asks the loop for a snapshot of
    plain values and waits for it (``SNAPSHOT_TIMEOUT_S``); if the loop does
    not answer in time (blocked, or closed), the last snapshot is served.
    """

    SNAPSHOT_TIMEOUT_S = 2.0

    def __init__(self, engine, metrics):
        self.engine = engine
        self.metrics = metrics
        self._last = None

    def _snapshot(self):
        loop = self.metrics.loop
        on_loop = False
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            pass
        if loop is None or on_loop:
            snap = self.engine.snapshot()
        else:
            fut = concurrent.futures.Future()

            def take():
                try:
                    fut.set_result(self.engine.snapshot())
                except Exception as exc:  # noqa: BLE001 - handed to the scraping thread
                    fut.set_exception(exc)
            try:
                loop.call_soon_threadsafe(take)
                snap = fut.result(self.SNAPSHOT_TIMEOUT_S)
            except (RuntimeError, concurrent.futures.TimeoutError):
                snap = self._last
                if snap is None:
                    return None
        self._last = snap
        return snap

    def collect(self):
        snap = self._snapshot()
        if snap is None:
            return
        counters = snap["counters"]
        depth = GaugeMetricFamily("parm_frontend_queue_depth", "batches queued, by role", labels=["role"])
        depths = snap["queue_depths"]
        for role in ("data", "parity", "backup"):
            depth.add_metric([role], depths.get(role, 0))
        yield depth
        flight = GaugeMetricFamily("parm_frontend_batches_in_flight", "instance calls in flight, by role",
                                   labels=["role"])
        for role, n in snap["in_flight"].items():
            flight.add_metric([role], n)
        yield flight
        yield GaugeMetricFamily("parm_frontend_queries_in_system", "admitted, not yet done",
                                value=snap["in_system"])
        yield GaugeMetricFamily("parm_frontend_open_groups", "coding groups not yet finished",
                                value=snap["open_groups"])
        inst = GaugeMetricFamily("parm_frontend_instances", "known instances, by role", labels=["role"])
        for role, n in snap["instances"].items():
            inst.add_metric([role], n)
        yield inst
        for name, value in snap["gauges"].items():      # seconds: *_s -> *_seconds
            metric = name[:-2] + "_seconds" if name.endswith("_s") else name
            yield GaugeMetricFamily(f"parm_frontend_{metric}", f"redundancy policy: {name}", value=value)
        c = CounterMetricFamily("parm_frontend_events", "engine event counters", labels=["event"])
        for name, value in counters.items():
            c.add_metric([name], value)
        yield c
        for name, metric, doc in (
                ("encodes", "encodes", "parity batches encoded"),
                ("decodes", "decodes", "decodes run"),
                ("reconstructions", "reconstructions", "batches answered by reconstruction"),
                ("redispatches", "redispatches", "batches re-dispatched after an erasure"),
                ("groups", "groups", "coding groups formed"),
                ("partial_groups", "partial_groups",
                 "coding groups sealed partial (fewer than k batches: no parity, unprotected)"),
                ("rejections", None, "queries rejected at admission")):
            value = (counters["rejected_invalid"] + counters["rejected_overloaded"]
                     + counters["rejected_unavailable"]) if metric is None else counters[metric]
            yield CounterMetricFamily(f"parm_frontend_{name}", doc, value=value)


class Metrics(NullObserver):
    """Prometheus metrics of one frontend."""

    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        self.e2e = Histogram("parm_frontend_e2e_latency_seconds", "E2E_LATENCY: admission to answer",
                             ["source"], buckets=_LAT_BUCKETS, registry=self.registry)
        self._e2e_by_source = {s.value: self.e2e.labels(s.name) for s in Source if s.value}
        self.queue = Histogram("parm_frontend_queue_latency_seconds",
                               "QUEUE_LATENCY: batch formed to first dispatch", ["role"],
                               buckets=_LAT_BUCKETS, registry=self.registry)
        self._queue_by_role = {r: self.queue.labels(r) for r in ("data", "parity", "backup")}
        self.encoding = Histogram("parm_frontend_encoding_latency_seconds",
                                  "ENCODING_LATENCY: gather + kernel + serialisation",
                                  buckets=_CODE_BUCKETS, registry=self.registry)
        self.decoding = Histogram("parm_frontend_decoding_latency_seconds",
                                  "DECODING_LATENCY: gather + kernel", buckets=_CODE_BUCKETS,
                                  registry=self.registry)
        self._server = None
        self.loop = None        # the engine's loop: scrapes take their snapshot on it
        if engine is not None:
            self.attach(engine)

    def attach(self, engine):
        self.registry.register(_EngineCollector(engine, self))

    def serve(self, port, host="0.0.0.0"):
        """Starts the HTTP endpoint (call on the engine's loop); returns the bound port."""
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def query_done(self, q, batch, group_id):
        if q.source:
            self._e2e_by_source[q.source].observe(q.answered_s - q.received_s)

    def dispatched(self, batch, queue_s):
        self._queue_by_role[batch.role].observe(queue_s)

    def encoded(self, seconds):
        self.encoding.observe(seconds)

    def decoded(self, seconds):
        self.decoding.observe(seconds)


class Records(NullObserver):
    """JSON-lines records: one line per query, per group, per late original."""

    def __init__(self, directory, clock):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._queries = open(self.dir / "queries.jsonl", "a", buffering=1 << 16)
        self._groups = open(self.dir / "groups.jsonl", "a", buffering=1 << 16)
        # wall = mono + offset: records carry Unix times so they line up with the load generator's.
        self._offset = time.time() - clock.now()
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode

    def query_done(self, q, batch, group_id):
        off = self._offset
        b = batch
        rec = {
            "type": "query", "request_id": q.request_id, "query_id": q.qid,
            "batch_id": b.batch_id if b is not None else None,
            "group_id": group_id if b is not None else None,
            "row": q.row, "status": q.status,
            "source": source_name(q.source),
            "received_s": q.received_s + off, "answered_s": q.answered_s + off,
            "e2e_latency_ms": (q.answered_s - q.received_s) * 1e3,
            "queue_latency_ms": ((b.dispatched_s - b.created_s) * 1e3
                                 if b is not None and b.dispatched_s is not None else None),
            "batch_wait_ms": (b.created_s - q.received_s) * 1e3 if b is not None else None,
            "instance_id": q.instance_id, "attempts": b.attempts if b is not None else 0,
            "lateness_wait_ms": q.lateness_wait_s * 1e3 if q.lateness_wait_s is not None else None,
        }
        self._queries.write(self._dumps(rec) + "\n")

    def group_done(self, g, reason):
        off = self._offset
        rec = {
            "type": "group", "group_id": g.group_id, "k": g.k, "reason": reason,
            "formed_s": g.formed_s + off, "sealed_s": _at(g.sealed_s, off), "padded": g.padded,
            "full": len(g.members) == g.k, "coded": g.coded,
            "parity_dispatched_s": _at(g.parity.dispatched_s if g.parity is not None else None, off),
            "parity_answered_s": _at(g.parity.answered_s if g.parity is not None else None, off),
            "data_answered_s": [_at(m.answered_s, off) for m in g.members],
            "data_dispatched_s": [_at(m.dispatched_s, off) for m in g.members],
            "data_instances": [sorted(m.exclude) for m in g.members],
            "parity_instances": sorted(g.parity.exclude) if g.parity is not None else [],
            "decoded_s": _at(g.decoded_s, off),
            "data_batch_ids": [m.batch_id for m in g.members],
            "parity_batch_id": g.parity.batch_id if g.parity is not None else None,
            "encoding_latency_us": g.encode_us, "decoding_latency_us": g.decode_us,
            "missing_index": g.missing,
            "decoded_index": g.decoded,
            "late_threshold_ms": g.late_threshold_s * 1e3 if g.late_threshold_s is not None else None,
            "missing_batch_id": g.members[g.missing].batch_id if g.missing is not None else None,
            "parity_answered": g.parity_output is not None,
            "originals_answered": g.n_outputs,
            "late_original": g.late,
        }
        self._groups.write(self._dumps(rec) + "\n")

    def late_original(self, batch, delay_ms, max_abs_error, agree):
        rec = {
            "type": "late_original", "batch_id": batch.batch_id, "group_id": batch.group_id,
            "role_answered": "RECONSTRUCTED" if batch.group is not None else "BACKUP",
            "request_ids": [q.request_id for q in batch.queries],
            "delay_ms": delay_ms, "max_abs_error": max_abs_error, "argmax_agreement": agree,
        }
        self._queries.write(self._dumps(rec) + "\n")

    def flush(self):
        for f in (self._queries, self._groups):
            if not f.closed:
                f.flush()

    def close(self):
        self.flush()
        for f in (self._queries, self._groups):
            if not f.closed:
                os.fsync(f.fileno())
                f.close()


class CpuWait:
    """How long this process's threads waited for a CPU since the last ``sample()``.

    Linux keeps, per thread, the time it spent runnable but not running
    (``/proc/self/task/TID/schedstat``, second field, ns; needs ``CONFIG_SCHED_INFO``,
    present in common kernels). ``sample()`` sums the growth of that counter over the
    process's threads, and also returns the growth of the machine's CPU pressure (PSI
    ``some total``, ``/proc/pressure/cpu``, us): the time any task on the machine waited.

    Cost: one ``pread`` per thread and one for PSI per sample, on kept descriptors; the
    thread list is re-read at most every ``rescan_s`` (a thread started since counts from
    its first sample, one that ended drops out). ``available`` is False (and ``sample``
    returns ``(0.0, None)``) where the files do not exist, and after ``close``, which
    closes the descriptors.
    """

    def __init__(self, proc="/proc", *, rescan_s=1.0):
        self._task_dir = os.path.join(proc, "self", "task")
        self.rescan_s = rescan_s
        self._fds = {}               # tid -> fd of its schedstat
        self._last = {}              # tid -> wait ns at the last sample
        self._psi_fd = self._open(os.path.join(proc, "pressure", "cpu"))
        self._psi_last = self._psi_total()
        self._rescan()
        self._next_scan = time.monotonic() + rescan_s
        self.available = bool(self._fds)

    @staticmethod
    def _open(path):
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None

    @staticmethod
    def _read(fd):
        try:
            return os.pread(fd, 256, 0)
        except OSError:
            return None

    def _psi_total(self):
        if self._psi_fd is None:
            return None
        return parse_psi_some(self._read(self._psi_fd))

    def _rescan(self):
        try:
            tids = set(os.listdir(self._task_dir))
        except OSError:
            return
        for tid in list(self._fds):
            if tid not in tids:
                self._drop(tid)
        for tid in tids - set(self._fds):
            fd = self._open(os.path.join(self._task_dir, tid, "schedstat"))
            if fd is not None:
                self._fds[tid] = fd

    def _drop(self, tid):
        os.close(self._fds.pop(tid))
        self._last.pop(tid, None)

    def sample(self):
        """(ms this process's threads waited for a CPU, ms any task on the machine waited or
        None) since the previous sample."""
        if not self.available:
            return 0.0, None
        now = time.monotonic()
        if now >= self._next_scan:
            self._rescan()
            self._next_scan = now + self.rescan_s
        waited = 0
        for tid, fd in list(self._fds.items()):
            data = self._read(fd)
            if not data:
                self._drop(tid)         # the thread ended
                continue
            try:
                wait = int(data.split()[1])
            except (IndexError, ValueError):
                continue
            last = self._last.get(tid)
            self._last[tid] = wait
            if last is not None and wait > last:
                waited += wait - last
        machine_ms = None
        psi = self._psi_total()
        if psi is not None and self._psi_last is not None:
            machine_ms = max(0, psi - self._psi_last) / 1e3
        self._psi_last = psi
        return waited / 1e6, machine_ms

    def close(self):
        for tid in list(self._fds):
            self._drop(tid)
        if self._psi_fd is not None:
            os.close(self._psi_fd)
            self._psi_fd = None
        self.available = False


class Stalls:
    """Records when the frontend's own process stopped serving: ``stalls.jsonl`` in the
    records directory, one line per event, so a slow query can be told apart from a
    slow instance or network (``deploy.runner.tail``).

    Two kinds, each a line ``{"type": "stall", "kind", "start_s", "ms", ...}`` (Unix times):
    * ``gc``: a garbage collection that took at least ``gc_min_ms`` (``generation``);
      measured by ``gc.callbacks``, which run in the collecting thread;
    * ``loop``: the event loop ran a timer at least ``loop_min_ms`` late: a probe is
      scheduled every ``interval_s`` and measures its own lateness (``start_s`` is when
      it was due), whatever held the loop (a long callback, a collection, the process
      not being scheduled).
    * ``cpu``: the frontend's threads waited for a CPU (runnable, not running) for at least
      ``cpu_min_ms`` in total during one probe interval (``start_s`` is the interval's start,
      ``span_ms`` its length); ``machine_ms`` is how long, in the same interval, any task on
      the machine waited for a CPU (Linux PSI ``some``; null where the kernel has none).
      Measured by ``CpuWait``; absent on kernels without per-thread ``schedstat``. On a
      machine where the frontend shares its cores (the one-machine testbed), this is what
      slows a query everywhere in the frontend at once without any one long stall.
    Lines are buffered and written by ``flush`` (the app's 1 s flush), not in the GC
    callback. Invariant: ``start`` installs the callback and the probe, ``close`` removes
    both, once each, and closes the meter's files.
    """

    def __init__(self, directory, *, interval_s=0.01, loop_min_ms=5.0, gc_min_ms=1.0, cpu_min_ms=1.0):
        self._file = open(pathlib.Path(directory) / "stalls.jsonl", "a", buffering=1 << 16)
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode
        self.interval_s = interval_s
        self.loop_min_ms = loop_min_ms
        self.gc_min_ms = gc_min_ms
        self.cpu_min_ms = cpu_min_ms
        self._cpu = None
        self._cpu_at = None
        self._pending = []
        self._gc_start = None
        self._handle = None
        self._loop = None
        self._due = None
        self.counts = {"gc": 0, "loop": 0, "cpu": 0}

    def start(self):
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        self._cpu = CpuWait()
        if self._cpu.available:
            self._cpu.sample()          # the baseline: waits before start are not counted
            self._cpu_at = time.time()
        self._arm()

    def _arm(self):
        self._due = self._loop.time() + self.interval_s
        self._handle = self._loop.call_at(self._due, self._probe)

    def _probe(self):
        late_ms = (self._loop.time() - self._due) * 1e3
        if late_ms >= self.loop_min_ms:
            self._add("loop", time.time() - late_ms / 1e3, late_ms)
        if self._cpu_at is not None:
            now = time.time()
            wait_ms, machine_ms = self._cpu.sample()
            if wait_ms >= self.cpu_min_ms:
                self._add("cpu", self._cpu_at, wait_ms, span_ms=(now - self._cpu_at) * 1e3,
                          machine_ms=machine_ms)
            self._cpu_at = now
        self._arm()

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            ms = (time.perf_counter() - self._gc_start) * 1e3
            self._gc_start = None
            if ms >= self.gc_min_ms:
                self._add("gc", time.time() - ms / 1e3, ms, generation=info.get("generation"),
                          collected=info.get("collected"))

    def _add(self, kind, start_s, ms, **extra):
        self.counts[kind] += 1
        self._pending.append({"type": "stall", "kind": kind, "start_s": start_s, "ms": ms, **extra})

    def flush(self):
        pending, self._pending = self._pending, []
        for rec in pending:
            self._file.write(self._dumps(rec) + "\n")
        if not self._file.closed:
            self._file.flush()

    def close(self):
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._cpu is not None:
            self._cpu.close()
        self._cpu_at = None
        if not self._file.closed:
            self.flush()
            self._file.close()


class Fanout(NullObserver):
    """Sends every event to several observers."""

    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def query_done(self, q, batch, group_id):
        for o in self.observers:
            o.query_done(q, batch, group_id)

    def group_done(self, g, reason):
        for o in self.observers:
            o.group_done(g, reason)

    def late_original(self, batch, delay_ms, max_abs_error, agree):
        for o in self.observers:
            o.late_original(batch, delay_ms, max_abs_error, agree)

    def encoded(self, seconds):
        for o in self.observers:
            o.encoded(seconds)

    def decoded(self, seconds):
        for o in self.observers:
            o.decoded(seconds)

    def dispatched(self, batch, queue_s):
        for o in self.observers:
            o.dispatched(batch, queue_s)
