"""Waiting in a test for something to happen: bounded polling, so a test waits
for an event, never for a duration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_S = 0.01
POLLS = 1000  # of POLL_S: 10 s at most for anything a test waits for


async def until(what: str, check: Callable[[], bool]) -> None:
    for _ in range(POLLS):
        if check():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")
