"""Clocks: the one way a service's core reads time, sleeps or sets a timer.

Cores never call ``time.monotonic``, ``asyncio.sleep`` or ``loop.call_later``
themselves; they receive a ``Clock``. ``LoopClock`` is the real one
(``time.monotonic`` plus the running event loop's timers); ``ManualClock`` is
the injected clock of unit tests: time moves only when the test calls
``advance``, which fires due timers in deadline order, so timeouts, heartbeats
and polls are tested without sleeping.

The interface is that of ``services.frontend.clock`` (``now``, ``call_later``)
plus ``sleep``, which every clock has through ``call_later``.
"""

import abc
import asyncio
import heapq
import itertools
import time

__all__ = ["Clock", "LoopClock", "ManualClock", "REAL"]


def _wake(future):
    if not future.done():
        future.set_result(None)


class Clock(abc.ABC):
    """Interface: ``now()`` in seconds (monotonic), ``call_later`` and ``sleep``."""

    @abc.abstractmethod
    def now(self):
        """Seconds, monotonic."""

    @abc.abstractmethod
    def call_later(self, delay_s, callback, *args):
        """Runs ``callback(*args)`` after ``delay_s``; returns a handle with ``cancel()``."""

    async def sleep(self, delay_s):
        """Returns after ``delay_s`` on this clock (cancellable)."""
        future = asyncio.get_running_loop().create_future()
        handle = self.call_later(delay_s, _wake, future)
        try:
            await future
        finally:
            handle.cancel()


class LoopClock(Clock):
    """``time.monotonic`` and the running loop's timers (stateless: one
    instance serves every loop and thread)."""

    now = staticmethod(time.monotonic)

    def call_later(self, delay_s, callback, *args):
        return asyncio.get_running_loop().call_later(max(0.0, delay_s), callback, *args)

    async def sleep(self, delay_s):
        await asyncio.sleep(max(0.0, delay_s))


#: The real clock, for defaults (``clock=None`` means this one).
REAL = LoopClock()


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

    async def run_for(self, duration_s):
        """Advances ``duration_s`` timer by timer, letting the event loop run
        what each timer wakes before the next one fires."""
        target = self._now + duration_s
        await _settle()
        while True:
            due = [h.when for _, _, h in self._heap if not h.cancelled and h.when <= target]
            if not due:
                break
            self.advance(max(0.0, min(due) - self._now))
            await _settle()
        self.advance(target - self._now)
        await _settle()


async def _settle(rounds=20):
    """Lets ready callbacks and the coroutines they wake run (a few loop turns)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
