"""Clocks: the one place the frontend's core reads time or schedules timers.

The core never calls ``time`` or ``loop.call_later`` itself; it receives a
``Clock``. ``LoopClock`` is the real one (``time.monotonic`` plus the running
event loop's timers); ``ManualClock`` is the injected clock of the unit tests:
time moves only when the test calls ``advance``, which fires due timers in
deadline order, so timeouts are tested without sleeping.
"""

import abc
import asyncio
import heapq
import itertools
import time


class Clock(abc.ABC):
    """Interface: ``now()`` in seconds (monotonic) and ``call_later``."""

    @abc.abstractmethod
    def now(self):
        """Seconds, monotonic."""

    @abc.abstractmethod
    def call_later(self, delay_s, callback, *args):
        """Runs ``callback(*args)`` after ``delay_s``; returns a handle with ``cancel()``."""


class LoopClock(Clock):
    """``time.monotonic`` and the running loop's timers (bound lazily)."""

    def __init__(self):
        self._loop = None

    now = staticmethod(time.monotonic)

    def call_later(self, delay_s, callback, *args):
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, delay_s), callback, *args)


class _ManualHandle:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class ManualClock(Clock):
    """A clock that moves only when told to (tests)."""

    def __init__(self, start_s=1000.0):
        self._now = float(start_s)
        self._heap = []
        self._seq = itertools.count()

    def now(self):
        return self._now

    def call_later(self, delay_s, callback, *args):
        handle = _ManualHandle(self._now + max(0.0, delay_s), callback, args)
        heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
        return handle

    def pending(self):
        """Number of timers not yet fired or cancelled."""
        return sum(1 for _, _, h in self._heap if not h.cancelled)

    def advance(self, delta_s):
        """Moves time forward by ``delta_s``, firing every timer due on the way."""
        target = self._now + delta_s
        while self._heap and self._heap[0][0] <= target:
            when, _, handle = heapq.heappop(self._heap)
            self._now = max(self._now, when)
            if not handle.cancelled:
                handle.cancelled = True
                handle.callback(*handle.args)
        self._now = target
