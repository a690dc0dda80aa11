import numpy as np
import pytest

from loadgen.schedule import arrival_times, build_schedule


def test_same_seed_same_schedule_and_clients_differ():
    a = build_schedule(50, num_examples=30, seed=3, num_queries=100, warmup_queries=5)
    b = build_schedule(50, num_examples=30, seed=3, num_queries=100, warmup_queries=5)
    c = build_schedule(50, num_examples=30, seed=3, client_index=1, num_queries=100, warmup_queries=5)
    np.testing.assert_array_equal(a.times_s, b.times_s)
    np.testing.assert_array_equal(a.examples, b.examples)
    assert not np.allclose(a.times_s, c.times_s)
    assert len(a) == 105 and a.num_warmup == 5


def test_interarrivals_are_exponential_with_mean_one_over_rate():
    times = arrival_times(40.0, seed=1, count=40000)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(1 / 40.0, rel=0.03)
    # Exponential: std == mean, and P(gap > mean) = e^-1.
    assert gaps.std() == pytest.approx(1 / 40.0, rel=0.05)
    assert np.mean(gaps > 1 / 40.0) == pytest.approx(np.exp(-1), abs=0.01)


def test_duration_mode_keeps_warmup_prefix_and_stops_at_duration():
    warm = build_schedule(100, num_examples=10, seed=2, num_queries=7, warmup_queries=7)
    dur = build_schedule(100, num_examples=10, seed=2, duration_s=30.0, warmup_queries=7)
    np.testing.assert_array_equal(dur.times_s[:7], warm.times_s[:7])
    assert dur.times_s[-1] <= dur.times_s[6] + 30.0
    measured = len(dur) - 7
    assert 2700 < measured < 3300  # Poisson(3000): 5+ standard deviations either way
    # Nothing beyond the window was dropped: the next draw is past it.
    longer = arrival_times(100, seed=2, count=len(dur) + 1)
    assert longer[len(dur)] > dur.times_s[6] + 30.0


def test_examples_cycle_a_permutation():
    s = build_schedule(10, num_examples=8, seed=0, num_queries=16)
    assert sorted(s.examples[:8]) == list(range(8))
    np.testing.assert_array_equal(s.examples[:8], s.examples[8:])


@pytest.mark.parametrize("kwargs", [dict(num_queries=0, duration_s=0), dict(num_queries=5, num_examples=0)])
def test_bad_arguments_raise(kwargs):
    args = dict(num_examples=5, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        build_schedule(10, **args)
    with pytest.raises(ValueError):
        arrival_times(0, seed=0, count=3)
