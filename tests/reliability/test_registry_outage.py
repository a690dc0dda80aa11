"""Regression: a registry restart must not empty the frontend's membership.

A restarted (empty) server is refilled by heartbeats within heartbeat_s; the
watcher used to report every instance as "left" at its first poll after the
outage (chaos scenario ``registry``: UNAVAILABLE for every query in between).
"""

import asyncio

from services.common.registry import EmbeddedRedis, Instance, RedisRegistry


def _inst(iid):
    return Instance(iid, "127.0.0.1:1", "data", "m", 0)


def test_watch_holds_leaves_after_an_outage_and_still_sees_changes():
    server = EmbeddedRedis(password="pw-outage").start()
    port = server.port

    async def body():
        r = RedisRegistry(server.url, "t-outage", timeout_s=0.3)
        events = []

        async def consume():
            async for event in r.watch(poll_s=0.05, hold_leaves_s=1.0):
                events.append((event.kind, event.instance.instance_id))

        await r.register(_inst("a"), ttl_s=30)
        await r.register(_inst("b"), ttl_s=30)
        task = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.stop, 1.0)
            await asyncio.sleep(0.5)  # outage: the last membership stands
            during = list(events)
            restarted = EmbeddedRedis(port=port, password="pw-outage").start()
            try:
                await asyncio.sleep(0.4)  # empty server, polled several times
                after_restart = list(events)
                await r.register(_inst("a"), ttl_s=30)  # a's heartbeat comes back, b's never does
                await r.register(_inst("c"), ttl_s=30)  # a change after the restart
                await asyncio.sleep(1.5)
            finally:
                await asyncio.to_thread(restarted.stop, 1.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await r.close()
        return during, after_restart, events

    try:
        during, after_restart, events = asyncio.run(body())
    finally:
        server.stop()
    assert during == [("joined", "a"), ("joined", "b")]
    assert after_restart == during  # nothing left while the restarted server was empty
    assert events[2:] == [("joined", "c"), ("left", "b")]  # then the change, then the real leave
