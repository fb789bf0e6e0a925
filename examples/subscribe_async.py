"""Read a topic with asyncio: every batch from the earliest offset to the
current end (or keep tailing with --follow), as polars DataFrames.

Run against `busd dev`, after examples/publish_polars.py:

    python examples/subscribe_async.py ticks
    python examples/subscribe_async.py ticks --follow
"""

from __future__ import annotations

import asyncio
import sys

import arrowbus
import arrowbus.aio


async def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    topic = args[0] if args else "ticks"
    follow = "--follow" in sys.argv
    async with await arrowbus.aio.connect() as bus:
        rows = 0
        # Credit-based: the broker sends ahead only what the credit allows;
        # a slow loop body slows the broker down, it never fills memory.
        async for batch in bus.subscribe(topic, start="earliest", until_end=not follow):
            df = batch.to_polars()
            rows += batch.num_rows
            print(f"p{batch.partition} @{batch.offset}: {batch.num_rows} rows")
            print(df.head(3))
        print(f"{rows} rows")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except arrowbus.TopicNotFound as e:
        sys.exit(f"subscribe_async: {e}")
