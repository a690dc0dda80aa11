"""The leaked-task check of the test packages (each package's conftest imports it).

``no_leaked_tasks`` (autouse) makes every ``asyncio.run`` during a test,
in the test or in the code it calls, check that the main coroutine left no
other task pending when it returned: ``asyncio.run`` would otherwise cancel
such tasks silently, and a leaked task is a timer, heartbeat or call that
nobody owns. The leaked tasks are cancelled and the test fails naming them.
"""

import asyncio

import pytest

_REAL_RUN = asyncio.run


async def cancel_leaked():
    """Cancels and awaits every task of the running loop but the current one;
    returns their coroutines' qualified names, sorted (empty: nothing leaked)."""
    await asyncio.sleep(0)  # let tasks finishing right now finish
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in leaked:
        task.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
    return sorted(t.get_coro().__qualname__ for t in leaked)


async def _checked(main):
    result = await main
    names = await cancel_leaked()
    if names:
        raise AssertionError(f"asyncio.run left tasks pending: {names}")
    return result


def checked_run(main, *, debug=None, **kwargs):
    """``asyncio.run`` that fails when ``main`` leaves tasks pending."""
    return _REAL_RUN(_checked(main), debug=debug, **kwargs)


@pytest.fixture(autouse=True)
def no_leaked_tasks(monkeypatch):
    monkeypatch.setattr(asyncio, "run", checked_run)
    yield
