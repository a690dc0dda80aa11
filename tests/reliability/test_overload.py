"""At 3x the sustainable rate the frontend sheds load with RESOURCE_EXHAUSTED,
answers what it admits within the deadline, and recovers at once."""

import pytest

from deploy.reliability import overload


@pytest.mark.slow
def test_overload_sheds_answers_admitted_in_time_and_recovers(tiny_artifacts, tmp_path):
    phases, peak_rss, base_rss, sustainable, limit = overload.run(
        tiny_artifacts, num_models=1, compute_ms=20.0, deadline_s=1.0, base_s=2.0, overload_s=3.0,
        recovery_s=2.0, work_dir=tmp_path)
    by = {p.name: p for p in phases}
    assert (sustainable, limit) == (50.0, 25)
    assert overload.check(phases, 1.0) == []
    over = by["overload"]
    assert over.errors.get("RESOURCE_EXHAUSTED", 0) > over.sent * 0.3  # it sheds, it does not queue
    assert over.ok > 0 and over.max_ok_ms <= 1000.0
    assert by["recovery"].ok == by["recovery"].sent > 0
    assert peak_rss < base_rss + 200 * 2**20  # bounded: no queue growth


def test_check_flags_missing_shedding_late_answers_and_slow_recovery():
    ok = overload.Phase("base", 1.0, sent=10, ok=10)
    over = overload.Phase("overload", 3.0, sent=30, ok=20, errors={"DEADLINE_EXCEEDED": 10}, late=2)
    rec = overload.Phase("recovery", 1.0, sent=10, ok=9, errors={"UNAVAILABLE": 1}, lost=1)
    problems = overload.check([ok, over, rec], 1.0)
    assert len(problems) == 4 and "no RESOURCE_EXHAUSTED" in problems[0]
