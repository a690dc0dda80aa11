"""Runs ``async def`` tests of this package in a fresh event loop.

Teardown asserts that the test left no task pending (a leaked task is a
timer or call nobody owns).
"""

import asyncio
import inspect

import pytest

from tests.frontend.models import write_deployment


@pytest.fixture
def models(tmp_path):
    """Manifest paths of the linear base, parity (k=2, sum) and backup models."""
    return write_deployment(tmp_path)


async def _run_checked(fn, kwargs):
    await fn(**kwargs)
    await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
    names = [t.get_coro().__qualname__ for t in leaked]
    # Calls parked in hanging fakes are cancelled by the engine's close(); any other task is a leak.
    assert not [n for n in names if "_run_call" not in n], f"test left tasks pending: {names}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {n: pyfuncitem.funcargs[n] for n in names}
    asyncio.run(_run_checked(fn, kwargs))
    return True
