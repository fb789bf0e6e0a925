"""The Python producers of `busbench compare`: arrowbus's Python client,
confluent-kafka and nats-py publishing the same Arrow IPC batches to a
topic busbench created, closed loop, for a fixed time.

busbench starts the servers, creates the topic, subscribes to it (that is
where loss is checked), writes the frames and runs this script once per
system and batch size:

    python compare_publish.py --system kafka --servers 127.0.0.1:9092 \
        --topic T --frames F.arrows --bodies F.bodies --duration 10 --window 1024

- arrowbus publishes the record batches of `--frames` (an Arrow IPC stream
  file): its client imports them through the C data interface and encodes
  them itself, which is the work a Python user's publish costs.
- Kafka and NATS publish `--bodies`: the Arrow IPC body of each of those
  batches exactly as busbench's Rust drivers send it (u32 little-endian
  length, then the bytes), so every system carries the same bytes.

The batches cycle in order: send i carries batch i mod K. Unacknowledged
batches are bounded like the Rust drivers' (`--window` batches and
`--window-bytes`); arrowbus's producer has its own window (5 batches per
partition) and `send` blocks while it is full.

It prints one JSON object on stdout: sent, acked, errors, first_error,
send_secs (start to last send), ack_secs (start to last ack), cpu_s (this
process's user + system CPU over the run) and the client's version.
`--probe` prints the versions of the modules it needs instead, or names
the one that is missing (exit status 3).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.metadata
import json
import resource
import struct
import sys
import time
from typing import Any, Optional

#: Longest wait for the last acks after the sending time is over.
DRAIN_TIMEOUT_S = 60.0
#: The Rust driver's message.max.bytes (bench/src/compare/kafka.rs): 1 MiB
#: batches with room for their envelope.
KAFKA_MESSAGE_MAX_BYTES = 16 * 1024 * 1024


class Tally:
    """Counts sends and their outcomes, and when the last of each happened."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.first_error: Optional[str] = None
        self.last_send = self.start
        self.last_ack = self.start
        self.inflight_bytes = 0

    def on_send(self, n: int) -> None:
        self.sent += 1
        self.inflight_bytes += n
        self.last_send = time.monotonic()

    def on_ack(self, n: int) -> None:
        self.acked += 1
        self.inflight_bytes -= n
        self.last_ack = time.monotonic()

    def on_error(self, n: int, e: object) -> None:
        self.errors += 1
        self.inflight_bytes -= n
        if self.first_error is None:
            self.first_error = f"{type(e).__name__}: {e}"

    @property
    def outstanding(self) -> int:
        return self.sent - self.acked - self.errors

    def report(self, client: str) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "first_error": self.first_error,
            "send_secs": self.last_send - self.start,
            "ack_secs": self.last_ack - self.start,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "client": client,
            "python": sys.version.split()[0],
        }


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def read_bodies(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError(f"{path}: truncated length at byte {at}")
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + n > len(data):
            raise ValueError(f"{path}: body of {n} bytes at byte {at} runs past the end")
        out.append(data[at : at + n])
        at += n
    if not out:
        raise ValueError(f"{path}: no bodies")
    return out


def run_arrowbus(a: argparse.Namespace) -> dict[str, Any]:
    import arrowbus
    import pyarrow as pa
    import pyarrow.ipc

    with pa.memory_map(a.frames) as source:
        batches = list(pa.ipc.open_stream(source))
    sizes = [b.nbytes for b in batches]
    bus = arrowbus.connect(broker=a.servers, ca=a.ca, server_name=a.server_name)
    producer = bus.producer()
    t = Tally()
    pending: collections.deque = collections.deque()

    def settle(item: tuple[Any, int]) -> None:
        ack, n = item
        try:
            ack.result()
            t.on_ack(n)
        except arrowbus.Error as e:
            t.on_error(n, e)

    end = t.start + a.duration
    i = 0
    while time.monotonic() < end:
        k = i % len(batches)
        try:
            # Blocks (GIL released) while the partition's window is full.
            pending.append((producer.send(a.topic, batches[k]), sizes[k]))
            t.on_send(sizes[k])
        except arrowbus.Error as e:
            t.sent += 1
            t.on_error(0, e)
        i += 1
        while pending and (pending[0][0].done() or len(pending) >= a.window):
            settle(pending.popleft())
    while pending:
        settle(pending.popleft())
    bus.close()
    return t.report(f"arrowbus {dist_version('arrowbus')} (this tree)")


def run_kafka(a: argparse.Namespace) -> dict[str, Any]:
    import confluent_kafka

    bodies = read_bodies(a.bodies)
    # The Rust driver's producer configuration (bench/src/compare/kafka.rs):
    # acks=all with idempotence, no linger, no compression.
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": a.servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 0,
            "compression.type": "none",
            "message.max.bytes": KAFKA_MESSAGE_MAX_BYTES,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    t = Tally()

    def delivered(err: Any, msg: Any) -> None:
        n = len(msg.value()) if msg is not None and msg.value() is not None else 0
        if err is not None:
            t.on_error(n, err)
        else:
            t.on_ack(n)

    end = t.start + a.duration
    i = 0
    while time.monotonic() < end:
        body = bodies[i % len(bodies)]
        while t.outstanding >= a.window or (
            t.outstanding > 0 and t.inflight_bytes + len(body) > a.window_bytes
        ):
            producer.poll(0.05)
        try:
            producer.produce(a.topic, body, on_delivery=delivered)
            t.on_send(len(body))
        except (BufferError, confluent_kafka.KafkaException) as e:
            t.sent += 1
            t.on_error(0, e)
        producer.poll(0)
        i += 1
    left = producer.flush(DRAIN_TIMEOUT_S)
    if left:
        t.first_error = t.first_error or f"{left} messages unacknowledged after {DRAIN_TIMEOUT_S} s"
    return t.report(
        f"confluent-kafka {dist_version('confluent-kafka')} (librdkafka {confluent_kafka.libversion()[0]})"
    )


async def run_nats_async(a: argparse.Namespace) -> dict[str, Any]:
    import nats

    bodies = read_bodies(a.bodies)
    nc = await nats.connect(servers=[f"nats://{s}" for s in a.servers.split(",")])
    # The window is ours (below); nats-py's own bound is set above it so it
    # never stalls first.
    js = nc.jetstream(timeout=30, publish_async_max_pending=a.window + 1)
    t = Tally()
    pending: collections.deque = collections.deque()

    async def settle_oldest() -> None:
        """Wait for the oldest publish's ack and count its outcome."""
        fut, n = pending.popleft()
        try:
            await asyncio.wait_for(asyncio.shield(fut), DRAIN_TIMEOUT_S)
            t.on_ack(n)
        except Exception as e:  # noqa: BLE001 - every failure is counted
            t.on_error(n, e)

    end = t.start + a.duration
    i = 0
    while time.monotonic() < end:
        body = bodies[i % len(bodies)]
        while pending and (
            pending[0][0].done()
            or len(pending) >= a.window
            or t.inflight_bytes + len(body) > a.window_bytes
        ):
            await settle_oldest()
        try:
            fut = await js.publish_async(a.topic, body)
            pending.append((fut, len(body)))
            t.on_send(len(body))
        except Exception as e:  # noqa: BLE001 - every failure is counted
            t.sent += 1
            t.on_error(0, e)
        i += 1
    while pending:
        await settle_oldest()
    await nc.close()
    return t.report(f"nats-py {dist_version('nats-py')}")


def probe() -> int:
    versions = {"python": sys.version.split()[0]}
    for module, dist in (
        ("pyarrow", "pyarrow"),
        ("arrowbus", "arrowbus"),
        ("confluent_kafka", "confluent-kafka"),
        ("nats", "nats-py"),
    ):
        try:
            __import__(module)
        except ImportError as e:
            print(json.dumps({"missing": module, "error": str(e)}))
            return 3
        versions[dist] = dist_version(dist)
    print(json.dumps(versions))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="store_true", help="print module versions and exit")
    p.add_argument("--system", choices=["arrowbus", "kafka", "nats"])
    p.add_argument("--servers", help="host:port[,host:port...]")
    p.add_argument("--ca", help="arrowbus: the CA file")
    p.add_argument("--server-name", help="arrowbus: the TLS server name")
    p.add_argument("--topic")
    p.add_argument("--frames", help="Arrow IPC stream file (arrowbus)")
    p.add_argument("--bodies", help="length-prefixed IPC bodies (Kafka, NATS)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--window", type=int, default=1024, help="unacknowledged batches")
    p.add_argument("--window-bytes", type=int, default=64 * 1024 * 1024)
    a = p.parse_args()
    if a.probe:
        return probe()
    missing = [
        f"--{k.replace('_', '-')}"
        for k in ("system", "servers", "topic")
        if getattr(a, k) is None
    ]
    if a.system == "arrowbus" and a.frames is None:
        missing.append("--frames")
    if a.system in ("kafka", "nats") and a.bodies is None:
        missing.append("--bodies")
    if missing:
        p.error("missing " + ", ".join(missing))
    if a.window < 1:
        p.error("--window must be at least 1")
    if a.system == "arrowbus":
        out = run_arrowbus(a)
    elif a.system == "kafka":
        out = run_kafka(a)
    else:
        out = asyncio.run(run_nats_async(a))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
