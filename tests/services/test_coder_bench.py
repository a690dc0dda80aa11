"""services.coder.bench runs at a tiny size and measures what it claims."""

import numpy as np

from services.coder import bench


def test_pool_saves_one_output_allocation_per_call():
    shape = (1, 3, 64, 64)
    records = bench.in_process([(shape, 2)], calls=5)
    by = {(r["op"], r["variant"]): r for r in records}
    assert set(by) == {(op, v) for op in ("encode", "decode") for v in ("pool", "alloc")}
    out_bytes = int(np.prod(shape)) * 4
    for op in ("encode", "decode"):
        saved = by[op, "alloc"]["peak_bytes"] - by[op, "pool"]["peak_bytes"]
        assert 0.95 * out_bytes <= saved <= 1.05 * out_bytes, (op, saved, out_bytes)


def test_process_runs_at_a_fixed_rate(capsys):
    assert bench.main(["--quick", "--calls", "2", "--rate", "20", "--duration-s", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "coder process at a fixed rate" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("pool ", "alloc "))]
    assert [r[0] for r in rows] == ["pool", "alloc"]
    for r in rows:
        assert r[-3] == "0"  # errors
