"""The open-loop arrival schedule: seeded Poisson arrivals, fixed in advance.

Inter-arrival times are i.i.d. exponential with mean ``1 / rate``; arrival
``i`` is at the cumulative sum of the first ``i + 1`` draws, in seconds since
the run started. The whole schedule is a function of ``(rate, counts, seed,
client_index)`` alone, computed before the first send, so nothing that
happens during the run (slow answers, errors) can move an arrival.
"""

from dataclasses import dataclass

import numpy as np

_CHUNK = 4096


def rng_for(seed, client_index, stream):
    """An independent generator per (seed, client, purpose)."""
    return np.random.default_rng([int(seed), int(client_index), int(stream)])


@dataclass(frozen=True)
class Schedule:
    """Arrival times (ndarray of shape (n,), float64, seconds, increasing)
    and which example each query sends (ndarray of shape (n,), int64);
    the first ``num_warmup`` are warm-up queries."""

    times_s: np.ndarray
    examples: np.ndarray
    num_warmup: int

    def __len__(self):
        return len(self.times_s)


def arrival_times(rate, *, seed, client_index=0, count=None, until_s=None, min_count=0):
    """Poisson arrival times at ``rate`` per second.

    Either ``count`` arrivals, or every arrival up to ``until_s`` seconds plus
    at least ``min_count`` arrivals before it. Draws are made in fixed-size
    chunks from ``rng_for(seed, client_index, 0)``, so the result depends on
    the arguments only.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = rng_for(seed, client_index, 0)
    scale = 1.0 / rate
    if count is not None:
        return np.cumsum(rng.exponential(scale, int(count)))
    parts, total, last = [], 0, 0.0
    while True:
        chunk = last + np.cumsum(rng.exponential(scale, _CHUNK))
        parts.append(chunk)
        total += len(chunk)
        last = chunk[-1]
        if total > min_count and last > until_s:
            break
    times = np.concatenate(parts)
    keep = max(int(np.searchsorted(times, until_s, side="right")), min_count)
    return times[:keep]


def build_schedule(rate, *, num_examples, seed, client_index=0, num_queries=0,
                   duration_s=0.0, warmup_queries=0):
    """The run's schedule: ``warmup_queries`` first, then the measured ones.

    Measured queries: ``num_queries`` if > 0, else every arrival within
    ``duration_s`` seconds after the last warm-up arrival. Examples are a
    seeded permutation of ``range(num_examples)``, cycled.
    """
    if num_examples <= 0:
        raise ValueError("no examples to send")
    if num_queries > 0:
        times = arrival_times(rate, seed=seed, client_index=client_index,
                              count=warmup_queries + num_queries)
    elif duration_s > 0:
        if warmup_queries:
            head = arrival_times(rate, seed=seed, client_index=client_index, count=warmup_queries)
            until = head[-1] + duration_s
        else:
            until = duration_s
        times = arrival_times(rate, seed=seed, client_index=client_index,
                              until_s=until, min_count=warmup_queries)
    else:
        raise ValueError("need num_queries > 0 or duration_s > 0")
    order = rng_for(seed, client_index, 1).permutation(num_examples)
    examples = order[np.arange(len(times)) % num_examples].astype(np.int64)
    return Schedule(times, examples, int(warmup_queries))
