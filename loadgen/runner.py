"""One load-generator run, in process: ``loadgen.run(spec)``.

Steps: probe the target with ``GetStatus`` (a clear ``TargetUnavailable``
when nothing answers), resolve the examples (``loadgen.inputs``), build the
seeded schedule (``loadgen.schedule``), send it open-loop
(``loadgen.sender``) over one ``FrontendClient``, return the records and the
deployment's description (``meta``).
"""

import asyncio
import time
from dataclasses import asdict, dataclass, field, replace

from loadgen.client import DEFAULT_TARGET, FrontendClient
from loadgen.inputs import resolve
from loadgen.schedule import build_schedule
from loadgen.sender import OpenLoopSender


@dataclass(frozen=True)
class Spec:
    """What to run (the fields of ``parm.v1.RunSpec``).

    ``rate`` is queries/s for this generator; exactly one of ``num_queries``
    (measured queries) and ``duration_s`` (send measured queries for this
    long) is > 0; ``warmup_queries`` are sent first and excluded from
    statistics. For ``control.run_remote`` and ``--clients``
    the rate and query counts are aggregate totals, split over generators.
    """

    target: str = DEFAULT_TARGET
    rate: float = 4.0
    num_queries: int = 0
    duration_s: float = 0.0
    warmup_queries: int = 0
    seed: int = 0
    deadline_s: float = 10.0
    manifest_json: str = ""
    inputs_path: str = ""
    run_id: str = "run"
    client_index: int = 0

    def validate(self):
        """Raises ValueError naming the first bad field."""
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.num_queries < 0 or self.duration_s < 0 or self.warmup_queries < 0:
            raise ValueError("num_queries, duration_s and warmup_queries must be >= 0")
        if (self.num_queries > 0) == (self.duration_s > 0):
            raise ValueError("need exactly one of num_queries > 0 and duration_s > 0")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if not self.target:
            raise ValueError("target is empty")
        return self

    def split(self, n):
        """``n`` specs with rate/n and the counts divided, client_index 0..n-1."""
        def share(total, i):
            return total // n + (1 if i < total % n else 0)
        return [replace(self, rate=self.rate / n, num_queries=share(self.num_queries, i),
                        warmup_queries=share(self.warmup_queries, i), client_index=i)
                for i in range(n)]


@dataclass
class RunResult:
    records: list
    stopped: bool = False
    meta: dict = field(default_factory=dict)


def status_meta(status):
    """The parts of a ``GetStatusResponse`` worth keeping with the results."""
    if status is None:
        return {}
    return {
        "redundancy_mode": status.redundancy_mode,
        "queue_mode": status.queue_mode,
        "k": status.k,
        "batch_size": status.batch_size,
        "model": status.model,
        "dataset": status.dataset,
        "encoder": status.encoder,
    }


async def run_async(spec, *, stop=None, on_progress=None, progress_interval_s=0.2, channels=1):
    """Runs ``spec``; see the module docstring.

    Args:
        spec: ``Spec`` (validated here).
        stop: optional ``asyncio.Event``; setting it ends the run early
            (outstanding queries are cancelled, ``stopped`` is True).
        on_progress: optional ``callable(Counters)`` called about every
            ``progress_interval_s`` seconds and once at the end.

    Raises:
        ValueError: a bad spec. ``loadgen.client.TargetUnavailable``: no
        frontend. ``loadgen.inputs.InputsError``: no examples.
    """
    spec.validate()
    client = FrontendClient(spec.target, channels=channels)
    try:
        status = await client.status()
        x, y, inputs_from = resolve(spec.inputs_path, spec.manifest_json, status)
        schedule = build_schedule(spec.rate, num_examples=len(x), seed=spec.seed,
                                  client_index=spec.client_index, num_queries=spec.num_queries,
                                  duration_s=spec.duration_s, warmup_queries=spec.warmup_queries)
        sender = OpenLoopSender(client.predict, schedule, x, y, deadline_s=spec.deadline_s,
                                run_id=spec.run_id, client_index=spec.client_index)
        meta = {**status_meta(status), "spec": asdict(replace(spec, manifest_json="")),
                "inputs": inputs_from, "started_unix_s": time.time()}
        task = asyncio.create_task(sender.run())
        waiters = {task}
        stop_task = asyncio.create_task(stop.wait()) if stop is not None else None
        if stop_task is not None:
            waiters.add(stop_task)
        stopped = False
        try:
            while True:
                done, _ = await asyncio.wait(waiters, timeout=progress_interval_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if on_progress is not None:
                    on_progress(sender.counters)
                if task in done:
                    break
                if stop_task is not None and stop_task in done:
                    stopped = True
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    break
        finally:
            for t in waiters:
                t.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
        if on_progress is not None:
            on_progress(sender.counters)
        meta["finished_unix_s"] = time.time()
        return RunResult(sender.records, stopped=stopped, meta=meta)
    finally:
        await client.close()


def run(spec=None, **fields):
    """Synchronous ``run_async``: ``loadgen.run(Spec(...))`` or
    ``loadgen.run(target=..., rate=..., num_queries=...)``."""
    spec = replace(spec or Spec(), **fields)
    return asyncio.run(run_async(spec))
