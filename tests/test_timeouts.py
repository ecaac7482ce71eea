"""Timeouts measure silence: a SilenceTimer expires only after `seconds` without a touch."""

from __future__ import annotations

import asyncio

import pytest

from hauler.core.errors import TransferTimeout
from hauler.core.timeouts import SilenceTimer


async def test_silence_raises_the_named_timeout():
    with pytest.raises(TransferTimeout) as raised:
        async with SilenceTimer(0.05, "communication_timeout", "upload from site-1"):
            await asyncio.sleep(10)
    assert raised.value.timeout_name == "communication_timeout"
    assert "upload from site-1" in str(raised.value) and "communication_timeout" in str(
        raised.value
    )


async def test_progress_keeps_a_transfer_alive_far_past_its_timeout():
    touches = 0
    async with SilenceTimer(1.0, "streaming_read_timeout", "download") as timer:
        for _ in range(40):  # 2 s in all, twice the timeout, touching every 50 ms
            await asyncio.sleep(0.05)
            timer.touch()
            touches += 1
    assert touches == 40


async def test_none_means_no_timeout():
    async with SilenceTimer(None, "train_timeout", "training") as timer:
        timer.touch()
        await asyncio.sleep(0.01)


async def test_an_error_inside_the_scope_is_not_turned_into_a_timeout():
    with pytest.raises(ValueError):
        async with SilenceTimer(5, "communication_timeout", "x"):
            raise ValueError("the peer's own failure")
