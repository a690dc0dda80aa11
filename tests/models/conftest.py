"""The models tests use the suite's ``tiny_artifacts`` (tests/conftest.py)."""

from tests.leaks import no_leaked_tasks  # noqa: F401 - autouse: no asyncio task left pending
