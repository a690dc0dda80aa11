"""The package's teardown check itself: an engine left open, or any task left pending, fails."""

import asyncio

import pytest

from tests.frontend.conftest import _run_checked
from tests.frontend.test_engine import make_engine, x


async def _hanging_call(close):
    e, clock, fleet = make_engine("none", data=1, modes={"d0:1": "hang"})
    e.submit(x(0))
    await asyncio.sleep(0)
    assert fleet["d0:1"].calls == [0]          # a call task is parked in the hanging fake
    if close:
        await e.close()


def test_an_engine_the_test_did_not_close_fails_it():
    with pytest.raises(AssertionError, match="did not close 1 engine"):
        asyncio.run(_run_checked(_hanging_call, {"close": False}))


def test_a_closed_engine_leaves_no_call_task():
    asyncio.run(_run_checked(_hanging_call, {"close": True}))


def test_a_pending_call_task_is_not_exempt():
    async def leaves_a_call_task():
        async def _run_call():
            await asyncio.Event().wait()
        asyncio.get_running_loop().create_task(_run_call())

    with pytest.raises(AssertionError, match="left tasks pending: .*_run_call"):
        asyncio.run(_run_checked(leaves_a_call_task, {}))
