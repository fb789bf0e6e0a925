"""Completion of asyncio futures from the client's runtime threads.

The native module spawns the work on its one tokio runtime and calls
``loop.call_soon_threadsafe(_complete, future, ok, value)`` when it is done,
so the future is only ever touched on its own event loop's thread.
"""

from __future__ import annotations

import asyncio
from typing import Any


def _complete(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # cancelled while the result was on its way
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
