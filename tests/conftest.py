"""Shared test configuration: hypothesis profile and a runner for `async def` tests.

Async tests run in a fresh event loop each (`asyncio.run`), bounded by
ASYNC_TEST_TIMEOUT_S so a hung transfer fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "hauler",
    deadline=None,  # CI has two busy cores; correctness, not speed, is under test
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("hauler")

ASYNC_TEST_TIMEOUT_S = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**arguments), ASYNC_TEST_TIMEOUT_S))
    return True
