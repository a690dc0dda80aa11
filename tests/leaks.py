"""The leaked-task check of the test packages (each package's conftest imports it).

``no_leaked_tasks`` (autouse) makes every ``asyncio.run`` during a test,
in the test or in the code it calls, check that the main coroutine left no
other task pending when it returned: ``asyncio.run`` would otherwise cancel
such tasks silently, and a leaked task is a timer, heartbeat or call that
nobody owns. The leaked tasks are cancelled and the test fails naming them.
"""

import asyncio
import types

import pytest

_REAL_RUN = asyncio.run


#: How long a task that is not a Python coroutine may take to end on its own once the test
#: is over: grpc's tasks are Cython coroutines, and ``server.stop()`` cancels its RPC tasks,
#: which then need more than one loop turn to finish (an awaitable that ``ensure_future``
#: wrapped, such as a grpc call object, counts too). Python coroutines get no such grace.
LIBRARY_GRACE_S = 1.0


def _coro_name(task):
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


def _is_python_coroutine(task):
    return isinstance(task.get_coro(), types.CoroutineType)


async def cancel_leaked():
    """Cancels and awaits every task of the running loop but the current one;
    returns their coroutines' qualified names, sorted (empty: nothing leaked).
    A task that is not a Python coroutine gets ``LIBRARY_GRACE_S`` to end
    first, and counts only if it is still pending then."""
    await asyncio.sleep(0)  # let tasks finishing right now finish
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    library = [t for t in pending if not _is_python_coroutine(t)]
    if library:
        await asyncio.wait(library, timeout=LIBRARY_GRACE_S)
    leaked = [t for t in pending if not t.done()]
    for task in leaked:
        task.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
    return sorted(_coro_name(t) for t in leaked)


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
