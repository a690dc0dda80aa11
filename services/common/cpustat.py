"""This machine's CPU use and CPU pressure (Linux ``/proc``), for telling a
measurement of the system apart from a measurement of a busy machine.

- ``parse_psi_some(data)``: the ``some ... total=N`` field (us) of a PSI file
  (``/proc/pressure/cpu``): the total time at least one task was runnable but
  waiting for a CPU. None if absent (kernels without PSI).
- ``MachineCpu``: ``start()`` and ``stop()`` around an interval; ``stop``
  returns the share of all cores' time that was busy and the share of the
  interval during which some task waited for a CPU (PSI ``some``), each None
  where the kernel does not give it.
"""

import os
import time


def parse_psi_some(data):
    """The ``total=`` of a PSI file's ``some`` line (us), or None."""
    if not data:
        return None
    if isinstance(data, str):
        data = data.encode()
    for line in data.splitlines():
        fields = line.split()
        if fields and fields[0] == b"some":
            for field in fields[1:]:
                if field.startswith(b"total="):
                    try:
                        return int(field[6:])
                    except ValueError:
                        return None
    return None


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class MachineCpu:
    """The machine's CPU between ``start()`` and ``stop()``; see the module doc."""

    def __init__(self, proc="/proc"):
        self._stat = os.path.join(proc, "stat")
        self._psi = os.path.join(proc, "pressure", "cpu")
        self._start = None

    def _snapshot(self):
        busy = total = cores = None
        data = _read(self._stat)
        if data:
            lines = data.splitlines()
            fields = lines[0].split()
            if fields and fields[0] == b"cpu":
                ticks = [int(x) for x in fields[1:]]
                # user nice system idle iowait irq softirq steal [guest guest_nice, inside user/nice]
                total = sum(ticks[:8])
                busy = total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
                cores = sum(1 for line in lines[1:] if line.startswith(b"cpu"))
        return time.monotonic(), busy, total, cores, parse_psi_some(_read(self._psi))

    def start(self):
        self._start = self._snapshot()

    def stop(self):
        """``{"cores", "busy_pct", "pressure_pct", "seconds"}`` since ``start()``."""
        if self._start is None:
            raise RuntimeError("MachineCpu.stop() before start()")
        t0, busy0, total0, cores, psi0 = self._start
        t1, busy1, total1, _, psi1 = self._snapshot()
        self._start = None
        seconds = t1 - t0
        busy_pct = None
        if busy0 is not None and busy1 is not None and total1 > total0:
            busy_pct = round(100.0 * (busy1 - busy0) / (total1 - total0), 1)
        pressure_pct = None
        if psi0 is not None and psi1 is not None and seconds > 0:
            pressure_pct = round(100.0 * (psi1 - psi0) / 1e6 / seconds, 1)
        return {"cores": cores, "busy_pct": busy_pct, "pressure_pct": pressure_pct, "seconds": round(seconds, 2)}
