"""A producer process killed mid-stream (SIGKILL) loses nothing it had
acknowledged: every acked frame is stored where its ack said, and every
stored batch decodes whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa

import arrowbus

PRODUCER = r"""
import sys, pyarrow as pa, arrowbus
topic = sys.argv[1]
bus = arrowbus.connect()
producer = bus.producer()
pending = []
seq = 0
while True:  # until killed
    n = 100 + seq % 37
    t = pa.table({"seq": pa.array(range(seq, seq + n), pa.int64()),
                  "pad": pa.array([b"x" * 64] * n)})
    pending.append((producer.send(topic, t), seq, n))
    seq += n
    while len(pending) > 8 or (pending and pending[0][0].done()):
        p, first, rows = pending.pop(0)
        a = p.result()
        print("ACK", first, rows, a.partition, a.offset, flush=True)
"""

ACKS_BEFORE_KILL = 60


def test_acknowledged_batches_survive_a_killed_producer(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic, partitions=2)
    child = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    acks = []
    deadline = time.monotonic() + 60
    assert child.stdout is not None
    while len(acks) < ACKS_BEFORE_KILL and time.monotonic() < deadline:
        line = child.stdout.readline().decode()
        if not line:
            break
        _, first, rows, part, off = line.split()
        acks.append((int(first), int(rows), int(part), int(off)))
    # Killed while batches are in flight (it keeps 8 pending).
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert len(acks) >= ACKS_BEFORE_KILL, child.stderr.read().decode() if child.stderr else ""

    stored: dict[tuple[int, int], int] = {}
    for b in bus.subscribe(topic, start="earliest", until_end=True):
        t = b.to_pyarrow()
        assert t.column("pad").to_pylist() == [b"x" * 64] * t.num_rows  # whole batches only
        for k, v in enumerate(t.column("seq").to_pylist()):
            stored[(b.partition, b.offset + k)] = v
    for first, rows, part, off in acks:
        got = [stored.get((part, off + k)) for k in range(rows)]
        assert got == list(range(first, first + rows)), (first, rows, part, off)
    # Unacked frames may or may not be there, but nothing is duplicated.
    values = list(stored.values())
    assert len(values) == len(set(values))
    assert len(values) >= sum(r for _, r, _, _ in acks)
