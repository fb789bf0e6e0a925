"""Threads, asyncio, the GIL and backpressure."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import arrowbus
import arrowbus.aio
from conftest import Busd


def stop_process(pid: int) -> None:
    """SIGSTOP `pid` and wait until every thread of it is stopped.

    kill() returns before the signal has reached every thread: a busd
    thread busy on another core may still answer a request for a moment,
    which would make the tests below race the signal.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:
                continue  # a thread that just ended
            # The state follows the command name, which is in parentheses.
            states.append(stat[stat.rindex(")") + 2])
        if states and all(s in "Tt" for s in states):
            return
        assert time.monotonic() < deadline, f"busd {pid} not stopped: thread states {states}"
        time.sleep(0.005)


def seq_table(start: int, n: int) -> pa.Table:
    return pa.table({"seq": pa.array(range(start, start + n), pa.int64())})


def all_rows(bus: arrowbus.Client, topic: str) -> dict[tuple[int, int], int]:
    """(partition, offset) -> seq of every stored row."""
    out = {}
    for b in bus.subscribe(topic, start="earliest", until_end=True):
        for k, v in enumerate(b.to_pyarrow().column("seq").to_pylist()):
            out[(b.partition, b.offset + k)] = v
    return out


def check_acks(bus, topic, acked: list[tuple[arrowbus.Ack, int, int]]) -> None:
    """Every acked frame (ack, first seq, rows) is stored where its ack says."""
    stored = all_rows(bus, topic)
    for ack, first, n in acked:
        assert ack.rows == n
        seqs = []
        for part, off, rows in ack.batches:
            seqs += [stored[(part, off + k)] for k in range(rows)]
        assert seqs == list(range(first, first + n)), (ack, first, n)


def test_publishing_from_threads(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic, partitions=3)
    producer = bus.producer()  # one producer shared by all threads
    acked: list = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(25):
            first = (t * 1000 + i) * 10
            ack = producer.publish(topic, seq_table(first, 10))
            with lock:
                acked.append((ack, first, 10))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(acked) == 100
    assert len({(a.partition, a.offset) for a, _, _ in acked}) == 100
    check_acks(bus, topic, acked)


def test_gil_is_released_while_waiting(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic, schema=pa.schema([("seq", pa.int64())]))
    sub = bus.subscribe(topic)  # latest: nothing to deliver yet
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(next(sub)))
    waiter.start()
    # This thread keeps running Python while the other waits in next().
    spins, end = 0, time.monotonic() + 0.3
    while time.monotonic() < end:
        spins += 1
    assert spins > 10_000
    assert waiter.is_alive() and not got
    bus.producer().publish(topic, seq_table(7, 1))
    waiter.join(10)
    assert got and got[0].to_pyarrow().column("seq").to_pylist() == [7]


def test_asyncio_publish_and_subscribe(busd: Busd, topic: str) -> None:
    async def main() -> None:
        async with await arrowbus.aio.connect() as bus:
            await bus.admin.create_topic(topic, partitions=2)
            producer = bus.producer()
            acks = await asyncio.gather(
                *(producer.publish(topic, seq_table(i * 5, 5)) for i in range(40))
            )
            assert sorted(a.rows for a in acks) == [5] * 40
            pending = await producer.send(topic, seq_table(1000, 3), partition=1)
            ack = await pending
            assert (ack.partition, ack.rows) == (1, 3)

            seen = []
            async with bus.subscribe(topic, start="earliest", until_end=True) as sub:
                async for batch in sub:
                    seen += batch.to_pyarrow().column("seq").to_pylist()
            assert sorted(seen) == list(range(200)) + [1000, 1001, 1002]

            info = await bus.admin.describe_topic(topic)
            assert info.rows == 203
            # Waiting for a batch that does not come can be cancelled.
            tail = await bus.subscribe(topic).open()  # "latest" is fixed here
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(tail.__anext__(), 0.3)
            await producer.publish(topic, seq_table(2000, 1))
            # A cancelled wait loses nothing: the batch comes next.
            b = await asyncio.wait_for(tail.__anext__(), 10)
            assert b.to_pyarrow().column("seq").to_pylist() == [2000]
            await tail.close()

    asyncio.run(main())


def test_asyncio_errors_are_the_hierarchy(busd: Busd, topic: str) -> None:
    async def main() -> None:
        bus = await arrowbus.aio.connect()
        with pytest.raises(arrowbus.TopicNotFound):
            await bus.admin.describe_topic(topic)
        with pytest.raises(arrowbus.TopicNotFound):
            async for _ in bus.subscribe(topic):
                pass

    asyncio.run(main())


@pytest.fixture
def own_busd(tmp_path: Path):
    """A broker of this test alone (it gets paused)."""
    node = Busd(tmp_path)
    node.start()
    yield node
    if node.proc is not None and node.proc.poll() is None:
        os.kill(node.proc.pid, signal.SIGCONT)
    node.stop()


def test_a_full_window_blocks_send_until_acks_return(own_busd: Busd, topic: str) -> None:
    bus = arrowbus.connect(own_busd.addr, ca=own_busd.ca, server_name="localhost")
    bus.admin.create_topic(topic)
    producer = bus.producer(max_inflight_batches=1)
    producer.publish(topic, seq_table(0, 1))  # schema set, stream open
    stop_process(own_busd.proc.pid)
    try:
        first = producer.send(topic, seq_table(1, 1))  # takes the only slot
        second: list = []
        t = threading.Thread(target=lambda: second.append(producer.send(topic, seq_table(2, 1))))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not second, "send must wait while the window is full"
        assert not first.done()
    finally:
        os.kill(own_busd.proc.pid, signal.SIGCONT)
    t.join(30)
    assert second
    a1, a2 = first.result(), second[0].result()
    assert (a1.offset, a2.offset) == (1, 2)
    assert first.result() == a1  # a result can be asked for again


def test_a_full_window_suspends_await(own_busd: Busd, topic: str) -> None:
    async def main() -> None:
        bus = await arrowbus.aio.connect(own_busd.addr, ca=own_busd.ca, server_name="localhost")
        await bus.admin.create_topic(topic)
        producer = bus.producer(max_inflight_batches=1)
        await producer.publish(topic, seq_table(0, 1))
        stop_process(own_busd.proc.pid)
        try:
            first = await producer.send(topic, seq_table(1, 1))
            # The event loop stays free while the send is suspended.
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(tick())
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(producer.send(topic, seq_table(2, 1)), 0.5)
            ticker.cancel()
            assert ticks >= 10
            assert not first.done()
        finally:
            os.kill(own_busd.proc.pid, signal.SIGCONT)
        assert (await first).offset == 1
        # Cancelling stopped the wait, not the publish (a frame is never
        # torn): the cancelled frame is stored next, then the new one.
        assert (await producer.publish(topic, seq_table(3, 1))).offset == 3
        seqs = [
            v
            async for b in bus.subscribe(topic, start="earliest", until_end=True)
            for v in b.to_pyarrow().column("seq").to_pylist()
        ]
        assert seqs == [0, 1, 2, 3]

    asyncio.run(main())


def test_linger_coalesces_small_frames(bus: arrowbus.Client, topic: str, seed: int) -> None:
    rng = random.Random(seed)
    bus.admin.create_topic(topic, partitions=2)
    producer = bus.producer(linger_ms=50)
    assert producer.linger_ms == 50
    sent, seq = [], 0
    for _ in range(300):
        n = rng.randint(0, 5)
        sent.append((producer.send(topic, seq_table(seq, n)), seq, n))
        seq += n
    producer.flush()
    assert all(p.done() for p, _, _ in sent)
    acked = [(p.result(), first, n) for p, first, n in sent]
    check_acks(bus, topic, acked)
    stored_batches = sum(p.batches for p in bus.admin.describe_topic(topic).partitions)
    assert stored_batches < 100, f"300 frames were stored as {stored_batches} batches"


def test_linger_off_stores_one_batch_per_frame(bus: arrowbus.Client, topic: str) -> None:
    bus.admin.create_topic(topic)
    # `batches` counts log entries, Raft's own included: count what we add.
    raft_entries = bus.admin.describe_topic(topic).partitions[0].batches
    producer = bus.producer()
    pend = [producer.send(topic, seq_table(i, 1)) for i in range(20)]
    assert [p.result().offset for p in pend] == list(range(20))
    assert bus.admin.describe_topic(topic).partitions[0].batches - raft_entries == 20


def test_large_frames_are_split_under_the_batch_limit(bus: arrowbus.Client, topic: str) -> None:
    n = 2_500_000  # 40 MB of Arrow data in one chunk
    t = pa.table({"seq": pa.array(range(n), pa.int64()), "v": pa.array(range(n), pa.float64())})
    assert t.nbytes > 2 * arrowbus.MAX_BATCH_BYTES
    bus.admin.create_topic(topic)
    raft_entries = bus.admin.describe_topic(topic).partitions[0].batches
    ack = bus.producer().publish(topic, t)
    assert ack.rows == n and len(ack.batches) >= 3
    info = bus.admin.describe_topic(topic).partitions[0]
    assert info.batches - raft_entries == len(ack.batches)
    assert info.bytes / len(ack.batches) < arrowbus.MAX_BATCH_BYTES
    back = bus.subscribe(topic, start="earliest", until_end=True).to_reader().read_all()
    assert back.equals(t)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_one_publish_of_a_long_reader_holds_the_window_not_the_stream(
    bus: arrowbus.Client, topic: str
) -> None:
    """A reader much larger than the producer's window, in one `publish`:
    the client holds what is in flight (64 MiB), not everything it sent.
    An ack not yet resolved keeps its batch's encoded body for a retry, so
    resolving acks only at the end grows by the whole stream."""
    rows = 1 << 17  # one int64 column: 1 MiB of Arrow memory per batch
    batch = pa.record_batch({"seq": pa.array(range(rows), pa.int64())})
    n = 384  # 384 MiB in all

    def frames():
        for _ in range(n):
            yield batch  # the same Arrow memory every time

    bus.admin.create_topic(topic)
    reader = pa.RecordBatchReader.from_batches(batch.schema, frames())
    start = rss_mib()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ack = bus.producer().publish(topic, reader)
    finally:
        done.set()
        sampler.join()
    growth = peak[0] - start
    print(f"RSS {start:.0f} MiB before, peak {peak[0]:.0f} MiB: +{growth:.0f} MiB for {n} MiB sent")
    assert ack.rows == n * rows
    assert sum(r for _, _, r in ack.batches) == n * rows
    # The window (64 MiB) plus encoding buffers; keeping every body would
    # be over 384.
    assert growth < 192, f"client RSS grew {growth:.0f} MiB while publishing {n} MiB"
