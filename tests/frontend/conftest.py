"""Runs ``async def`` tests of this package in a fresh event loop.

Teardown asserts that every engine the test built (``fakes.track``) was
closed by the test, and that the test left no task pending, call tasks
included (a leaked task is a timer or call nobody owns; an engine's close
ends its calls). An engine left open is closed here too, so one failure
does not cascade into the next test.
"""

import asyncio
import inspect

import pytest

from tests.frontend import fakes
from tests.frontend.models import write_deployment
from tests.leaks import cancel_leaked


@pytest.fixture
def models(tmp_path):
    """Manifest paths of the linear base, parity (k=2, sum) and backup models."""
    return write_deployment(tmp_path)


async def _run_checked(fn, kwargs):
    fakes.ENGINES.clear()
    try:
        await fn(**kwargs)
    finally:
        unclosed = [e for e in fakes.ENGINES if not e.closed]
        for e in unclosed:
            await e.close()
        fakes.ENGINES.clear()
    assert not unclosed, f"test did not close {len(unclosed)} engine(s) it built"
    names = await cancel_leaked()
    assert not names, f"test left tasks pending: {names}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {n: pyfuncitem.funcargs[n] for n in names}
    asyncio.run(_run_checked(fn, kwargs))
    return True
