"""coding_ext.meter: the allocation and CPU meter of make bench."""

import mmap
import os
import time

import numpy as np
import pytest

from coding_ext.meter import measure_step, process_cpu_s


def test_an_allocating_step_shows_its_bytes():
    n = 1 << 20
    stats = measure_step(lambda: np.ones(n, np.uint8), calls=5, warmup=1)
    assert n <= stats["peak_bytes"] < n + 4096
    assert stats["calls"] == 5 and stats["cpu_us"] >= 0


def test_a_step_into_a_reused_buffer_allocates_nothing_sizeable():
    buf = np.empty(1 << 20, np.uint8)
    stats = measure_step(lambda: buf.fill(1), calls=5, warmup=1)
    assert stats["peak_bytes"] < 4096
    assert stats["minor_faults_total"] == 0


def test_fresh_pages_fault():
    """Touching a fresh anonymous mapping faults (every call maps new pages)."""
    def step():
        m = mmap.mmap(-1, 1 << 20)
        np.frombuffer(m, np.uint8).fill(1)

    stats = measure_step(step, calls=3, warmup=0)
    assert stats["minor_faults"] > 0


def test_bad_calls():
    with pytest.raises(ValueError, match="calls must be >= 1"):
        measure_step(lambda: None, calls=0)


def test_process_cpu_s_grows():
    before = process_cpu_s(os.getpid())
    start = time.process_time()
    while time.process_time() - start < 0.1:   # 0.1 s of CPU: ten of the kernel's 10 ms ticks
        sum(i * i for i in range(10_000))
    assert process_cpu_s(os.getpid()) - before >= 0.05
