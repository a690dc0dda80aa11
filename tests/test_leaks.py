"""The leaked-task check itself (``tests/leaks.py``): what it reports and what it waits for."""

import asyncio

from tests import leaks


class _LibraryAwaitable:
    """Stands for a library's task that is not a Python coroutine (grpc's are Cython
    coroutines; ``ensure_future`` wraps this one in a generator)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __await__(self):
        return asyncio.sleep(self.seconds).__await__()


def test_a_pending_python_task_is_reported_even_if_it_would_end_soon():
    async def main():
        task = asyncio.ensure_future(asyncio.sleep(0.3))
        names = await leaks.cancel_leaked()
        return names, task.cancelled()

    names, cancelled = leaks._REAL_RUN(main())
    assert names == ["sleep"] and cancelled


def test_a_library_task_ending_within_the_grace_is_not_a_leak():
    async def main():
        task = asyncio.ensure_future(_LibraryAwaitable(0.2))
        names = await leaks.cancel_leaked()
        return names, task.done() and not task.cancelled()

    assert leaks._REAL_RUN(main()) == ([], True)


def test_a_library_task_still_pending_after_the_grace_is_reported(monkeypatch):
    monkeypatch.setattr(leaks, "LIBRARY_GRACE_S", 0.1)

    async def main():
        task = asyncio.ensure_future(_LibraryAwaitable(30))
        names = await leaks.cancel_leaked()
        return names, task.cancelled()

    names, cancelled = leaks._REAL_RUN(main())
    assert len(names) == 1 and "_wrap_awaitable" in names[0] and cancelled


def test_nothing_pending_is_nothing_reported():
    async def main():
        await asyncio.sleep(0)
        return await leaks.cancel_leaked()

    assert leaks._REAL_RUN(main()) == []
