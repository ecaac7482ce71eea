"""Shared test configuration: hypothesis profile and a runner for `async def` tests.

Async tests run in a fresh event loop each (`asyncio.run`), bounded by
ASYNC_TEST_TIMEOUT_S so a hung transfer fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from faultproxy import FaultProxy
from helpers import FAST_RETRIES, route_sites_through, server_data_port
from hypothesis import HealthCheck, settings

from hauler.admin import poc

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


@pytest.fixture
def faulty_federation(tmp_path):
    """A plaintext POC of two sites (so bit flips reach our checksums rather than TLS's) whose
    sites dial the data plane through a FaultProxy; yields (workspace, proxy)."""
    workspace = tmp_path / "poc"
    timeouts = {
        "communication_timeout": 20.0,
        "streaming_read_timeout": 10.0,
        "streaming_ack_wait": 10.0,
    }
    poc.prepare(workspace, 2, plaintext=True, dataplane=FAST_RETRIES, timeouts=timeouts)
    with FaultProxy(server_data_port(workspace)) as proxy:
        route_sites_through(workspace, proxy.port)
        poc.start(workspace)
        try:
            yield workspace, proxy
        finally:
            poc.stop(workspace)
