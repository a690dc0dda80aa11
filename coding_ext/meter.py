"""What one coded step costs in memory and CPU: the meter of ``make bench``.

    from coding_ext.meter import measure_step, process_cpu_s
    stats = measure_step(lambda: one_coded_query(), calls=500)

``measure_step`` runs ``step`` ``calls`` times (after ``warmup`` calls) and
reports, per call (medians over calls, plus totals):

- ``peak_bytes``: how far the traced heap rose above where it stood before
  the call (``tracemalloc``; numpy registers its data buffers there, so an
  ``out=None`` kernel output, a ``tobytes()`` copy and a protobuf bytes field
  all show). Divided by the size of one output this is "output-sized
  buffers allocated at once".
- ``minor_faults``: minor page faults (``getrusage``), what touching fresh
  pages costs; a reused, pre-faulted buffer causes none.
- ``cpu_us``: process CPU time per call, measured in a second pass without
  tracemalloc (which slows every allocation).

It is generic: the coder's benchmark (``services.coder.bench``) meters a call
through its servicer, and the frontend's can meter its encode-and-serialise
step the same way. ``process_cpu_s(pid)`` is the other half, for a service
process under load at a fixed rate: CPU seconds so far (user + system, the
process and its threads).
"""

import resource
import statistics
import time
import tracemalloc

__all__ = ["measure_step", "process_cpu_s"]


def measure_step(step, *, calls=200, warmup=20):
    """Meters ``step()``; returns a dict of per-call medians and totals (see module doc)."""
    calls = int(calls)
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    for _ in range(warmup):
        step()
    peaks, faults = [], []
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for _ in range(calls):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt)
            peaks.append(max(0, tracemalloc.get_traced_memory()[1] - before))
    finally:
        if not was_tracing:
            tracemalloc.stop()
    cpu = []
    for _ in range(calls):
        t0 = time.process_time_ns()
        step()
        cpu.append((time.process_time_ns() - t0) / 1e3)
    return {
        "calls": calls,
        "peak_bytes": int(statistics.median(peaks)),
        "peak_bytes_max": int(max(peaks)),
        "minor_faults": statistics.median(faults),
        "minor_faults_total": int(sum(faults)),
        "cpu_us": round(statistics.median(cpu), 2),
        "cpu_us_mean": round(statistics.fmean(cpu), 2),
    }


def process_cpu_s(pid):
    """CPU seconds (user + system) used so far by process ``pid`` and its threads."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system
