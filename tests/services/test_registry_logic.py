"""Heartbeat and watch logic on the in-memory registry with an injected clock
(no server, no sleeping); the real server has its own tests in test_registry.py."""

import asyncio

import pytest

from services.common.clock import ManualClock
from services.common.registry import Heartbeat, Instance, RegistryError, RegistryEvent
from services.common.registry_memory import MemoryRegistry


def _inst(iid, role="data", address="127.0.0.1:1"):
    return Instance(iid, address, role, model="m", k=2)


def test_manual_clock_sleep_wakes_only_when_time_reaches_it():
    async def body():
        clock = ManualClock(start_s=0.0)
        woke = []

        async def sleeper(name, delay_s):
            await clock.sleep(delay_s)
            woke.append((name, clock.now()))

        tasks = [asyncio.create_task(sleeper("late", 2.0)), asyncio.create_task(sleeper("early", 0.5))]
        await clock.run_for(0.4)
        before = list(woke)
        await clock.run_for(1.0)
        middle = list(woke)
        await clock.run_for(1.0)
        await asyncio.gather(*tasks)
        return before, middle, woke, clock.pending()

    before, middle, woke, pending = asyncio.run(body())
    assert before == []
    assert middle == [("early", 0.5)]
    assert woke == [("early", 0.5), ("late", 2.0)]
    assert pending == 0


def test_cancelled_sleep_leaves_no_timer():
    async def body():
        clock = ManualClock()
        task = asyncio.create_task(clock.sleep(5.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return clock.pending()

    assert asyncio.run(body()) == 0


def test_key_expires_by_ttl_and_heartbeat_keeps_it():
    async def body():
        clock = ManualClock()
        registry = MemoryRegistry(clock=clock)
        await registry.register(_inst("lapsed"), ttl_s=0.8)
        hb = Heartbeat(registry, _inst("kept"), heartbeat_s=0.2, ttl_s=1.0, clock=clock)
        await hb.start()
        await clock.run_for(0.7)
        both = [i.instance_id for i in await registry.list()]
        await clock.run_for(5.0)
        kept = [i.instance_id for i in await registry.list()]
        await hb.stop(deregister=True)
        gone = await registry.list()
        return both, kept, gone, clock.pending()

    both, kept, gone, pending = asyncio.run(body())
    assert both == ["kept", "lapsed"]
    assert kept == ["kept"]
    assert gone == []
    assert pending == 0  # the heartbeat's sleep was cancelled with its task


def test_heartbeat_survives_an_outage_and_re_registers():
    async def body():
        clock = ManualClock()
        registry = MemoryRegistry(clock=clock)
        hb = Heartbeat(registry, _inst("d0"), heartbeat_s=1.0, ttl_s=3.0, clock=clock)
        await hb.start()
        registry.set_reachable(False)
        registry.restart()  # a restarted server starts empty
        await clock.run_for(5.0)
        task_alive = not hb._task.done()
        registry.set_reachable(True)
        await clock.run_for(1.0)
        back = [i.instance_id for i in await registry.list()]
        await hb.stop()
        return task_alive, back

    task_alive, back = asyncio.run(body())
    assert task_alive
    assert back == ["d0"]


def test_heartbeat_rejects_a_period_not_below_the_ttl():
    with pytest.raises(ValueError, match="heartbeat_s"):
        Heartbeat(MemoryRegistry(), _inst("x"), heartbeat_s=3.0, ttl_s=3.0)


async def _collect(events, queue):
    async for event in events:
        queue.append(event)


def test_watch_reports_join_change_and_leave_on_the_poll_clock():
    async def body():
        clock = ManualClock()
        registry = MemoryRegistry(clock=clock)
        seen = []
        await registry.register(_inst("d0"), ttl_s=100)
        task = asyncio.create_task(_collect(registry.watch(poll_s=0.5, clock=clock), seen))
        await clock.run_for(0.1)
        first = list(seen)
        await registry.register(_inst("p0", role="parity"), ttl_s=100)
        await registry.register(_inst("d0", address="127.0.0.1:2"), ttl_s=100)
        await clock.run_for(0.3)
        not_yet = len(seen)  # the next poll is at 0.5 s
        await clock.run_for(0.2)
        joined_changed = seen[len(first):]
        await registry.deregister("p0")
        await clock.run_for(0.5)
        left = seen[len(first) + len(joined_changed):]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return first, not_yet, joined_changed, left

    first, not_yet, joined_changed, left = asyncio.run(body())
    assert first == [RegistryEvent("joined", _inst("d0"))]
    assert not_yet == 1
    assert joined_changed == [RegistryEvent("changed", _inst("d0", address="127.0.0.1:2")),
                              RegistryEvent("joined", _inst("p0", role="parity"))]
    assert left == [RegistryEvent("left", _inst("p0", role="parity"))]


def test_watch_holds_leaves_after_an_outage_then_reports_real_ones():
    async def body():
        clock = ManualClock()
        registry = MemoryRegistry(clock=clock)
        seen = []
        for iid in ("d0", "d1"):
            await registry.register(_inst(iid), ttl_s=100)
        task = asyncio.create_task(_collect(registry.watch(poll_s=0.5, hold_leaves_s=3.0, clock=clock), seen))
        await clock.run_for(0.1)
        registry.set_reachable(False)
        registry.restart()
        await clock.run_for(10.0)
        during = len(seen)
        registry.set_reachable(True)
        await registry.register(_inst("d0"), ttl_s=100)  # d0's heartbeat refills it; d1 is gone
        await clock.run_for(2.5)
        held = len(seen)
        await clock.run_for(1.0)
        after = seen[held:]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return during, held, after

    during, held, after = asyncio.run(body())
    assert during == 2  # the two first joins; nothing while the registry is down
    assert held == 2  # no "left" while the hold lasts
    assert after == [RegistryEvent("left", _inst("d1"))]


def test_memory_registry_outage_and_config():
    async def body():
        registry = MemoryRegistry(clock=ManualClock())
        await registry.set_config("run", {"k": 2})
        value = await registry.get_config("run")
        missing = await registry.get_config("nope", default=7)
        registry.set_reachable(False)
        with pytest.raises(RegistryError):
            await registry.list()
        await registry.close()
        return value, missing

    assert asyncio.run(body()) == ({"k": 2}, 7)


class _SwallowsOneCancel(MemoryRegistry):
    """A registry whose commands, once registered, hang until cancelled, and turn the first
    cancellation into a RegistryError, as redis-py does when its socket timeout races a cancel
    (only once, so that a failing test still ends). With ``answers``, the first cancellation
    is swallowed altogether and the command answers, as when redis-py's retry layer retries
    that error and the retry succeeds."""

    swallowed = 0
    hang = False
    answers = False

    async def _hang(self):
        try:
            await asyncio.sleep(3600)               # a command in flight when the cancel comes
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            if self.answers:
                return
            raise RegistryError("Timeout reading from socket") from None

    async def list(self, role=None):
        await self._hang()
        return []

    async def register(self, instance, ttl_s=3.0):
        if self.hang:
            await self._hang()
        return await super().register(instance, ttl_s)


async def _ends_when_cancelled(task):
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    return bool(done) and task.cancelled()


@pytest.mark.parametrize("answers", [False, True], ids=["cancel-as-error", "cancel-swallowed"])
def test_cancelling_a_watch_ends_it_even_when_the_client_turns_the_cancel_into_an_error(answers):
    async def body():
        registry = _SwallowsOneCancel()
        registry.answers = answers

        async def consume():
            async for _ in registry.watch(poll_s=0.01):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)                   # the watch is inside list() now
        return await _ends_when_cancelled(task), registry.swallowed

    ended, swallowed = asyncio.run(body())
    assert swallowed == 1 and ended, "the watch went on polling after its task was cancelled"


@pytest.mark.parametrize("answers", [False, True], ids=["cancel-as-error", "cancel-swallowed"])
def test_stopping_a_heartbeat_ends_it_even_when_the_client_turns_the_cancel_into_an_error(answers):
    async def body():
        registry = _SwallowsOneCancel()
        registry.answers = answers
        hb = Heartbeat(registry, _inst("d0"), heartbeat_s=0.01, ttl_s=3.0)
        await hb.start()
        registry.hang = True
        await asyncio.sleep(0.05)                   # the next beat is inside register() now
        return await _ends_when_cancelled(hb._task), registry.swallowed

    ended, swallowed = asyncio.run(body())
    assert swallowed == 1 and ended, "the heartbeat went on beating after its task was cancelled"
