"""Publish a polars DataFrame of ticks to a topic, creating it if needed.

Run against `busd dev` (it writes the client profile this reads):

    python examples/publish_polars.py ticks
"""

from __future__ import annotations

import datetime as dt
import sys

import polars as pl

import arrowbus


def main() -> None:
    topic = sys.argv[1] if len(sys.argv) > 1 else "ticks"
    bus = arrowbus.connect()  # the profile from `busd dev`
    try:
        bus.admin.create_topic(topic, partitions=3)
        print(f"created topic {topic}")
    except arrowbus.TopicExists:
        pass

    now = dt.datetime.now(dt.timezone.utc)
    df = pl.DataFrame(
        {
            "ts": [now + dt.timedelta(milliseconds=i) for i in range(6)],
            "symbol": ["AAPL", "MSFT", "NVDA", "AAPL", "MSFT", "NVDA"],
            "price": [189.5, 411.0, 875.25, 189.75, 410.5, 876.0],
            "size": [100, 250, 10, 50, 75, 20],
        }
    )
    producer = bus.producer()
    # Returns once the batch is fsynced on the broker; the frame is read in
    # place (Arrow C stream interface), not copied into Python objects.
    ack = producer.publish(topic, df)
    print(f"partition {ack.partition} offsets {ack.offset}..{ack.offset + ack.rows}")
    bus.close()


if __name__ == "__main__":
    main()
