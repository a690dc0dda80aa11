"""Fixtures of this package: the leaked-task check (tests/leaks.py)."""

from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending
