"""A sliding window of recent latencies and a quantile of it (no grpc, no engine state)."""

import collections

import numpy as np


class LatencyWindow:
    """The last ``size`` latencies; ``quantile`` (and the median) recomputed every ``every`` samples.

    Until ``min_samples`` values are in, ``value()`` and ``median()`` are None
    (callers use an initial value). Quantiles are numpy's linear interpolation.
    """

    def __init__(self, size=1000, every=50, min_samples=20, quantile=0.95):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self._values = collections.deque(maxlen=size)
        self._every = every
        self._min = min_samples
        self._count = 0
        self.quantile = quantile
        self._value = None
        self._median = None

    def add(self, value_s):
        self._values.append(value_s)
        self._count += 1
        if len(self._values) >= self._min and (self._value is None or self._count % self._every == 0):
            values = np.fromiter(self._values, float)
            self._value, self._median = (float(v) for v in np.quantile(values, [self.quantile, 0.5]))

    def value(self):
        """The current quantile (s), or None before ``min_samples`` values."""
        return self._value

    def median(self):
        """The current median (s), or None before ``min_samples`` values."""
        return self._median

    def p95(self):
        """``value()`` (kept for the hedged policy's wording: its default quantile is 0.95)."""
        return self._value

    def __len__(self):
        return len(self._values)
