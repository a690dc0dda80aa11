"""services.common.cpustat: PSI parsing and the machine's CPU over an interval, from a fake /proc."""

import os
import time

import pytest

from services.common.cpustat import MachineCpu, parse_psi_some

PSI = "some avg10=1.00 avg60=0.50 avg300=0.10 total={some}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"


def test_parse_psi_some_reads_the_some_line_only():
    assert parse_psi_some(PSI.format(some=123456).encode()) == 123456
    assert parse_psi_some(PSI.format(some=5)) == 5
    assert parse_psi_some(b"full avg10=0.00 total=7\n") is None
    assert parse_psi_some(b"some avg10=1.00 total=x\n") is None
    assert parse_psi_some(b"") is None and parse_psi_some(None) is None


def write_proc(root, ticks, psi_us=None):
    """/proc/stat with 2 cpus; ticks = (user, nice, system, idle, iowait, irq, softirq, steal)."""
    line = "cpu  " + " ".join(map(str, ticks)) + " 0 0\n"
    (root / "stat").write_text(line + "cpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\nctxt 6\n")
    if psi_us is not None:
        (root / "pressure").mkdir(exist_ok=True)
        (root / "pressure" / "cpu").write_text(PSI.format(some=psi_us))


def test_machine_cpu_busy_share_and_pressure_over_the_interval(tmp_path, monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    write_proc(tmp_path, (100, 0, 50, 800, 50, 0, 0, 0), psi_us=1_000_000)
    meter = MachineCpu(str(tmp_path))
    meter.start()
    # +400 ticks in all: 120 user, 20 system, 10 softirq busy; 200 idle, 50 iowait not busy
    write_proc(tmp_path, (220, 0, 70, 1000, 100, 0, 10, 0), psi_us=1_500_000)
    assert meter.stop() == {"cores": 2, "busy_pct": 37.5, "pressure_pct": 25.0, "seconds": 2.0}
    with pytest.raises(RuntimeError):
        meter.stop()                       # once per start


def test_machine_cpu_without_psi_or_proc(tmp_path):
    write_proc(tmp_path, (0, 0, 0, 100, 0, 0, 0, 0))
    meter = MachineCpu(str(tmp_path))
    meter.start()
    write_proc(tmp_path, (10, 0, 0, 190, 0, 0, 0, 0))
    got = meter.stop()
    assert got["busy_pct"] == 10.0 and got["pressure_pct"] is None and got["cores"] == 2
    bare = MachineCpu(str(tmp_path / "none"))
    bare.start()
    assert bare.stop()["busy_pct"] is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc")
def test_machine_cpu_sees_this_process_spinning():
    meter = MachineCpu()
    meter.start()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    got = meter.stop()
    # one busy thread out of os.cpu_count() cores, at least
    assert got["cores"] == os.cpu_count()
    assert got["busy_pct"] >= 100.0 / os.cpu_count() * 0.8
