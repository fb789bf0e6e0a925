"""Python client benchmark: the Python producer against the Rust producer on
the same frames, 1 vs 4 Python threads (pipelined `send`, and blocking
`publish` with one batch in flight per thread), the Python subscriber's
delivery rate, and the Python process's memory while it publishes 10 GB.

Everything runs in one invocation, variants interleaved round by round, so a
noisy machine affects them alike. The load (`uptime`) is recorded before and
after each measurement.

    cargo build --release -p arrowbus-broker -p arrowbus-client --example bench_ipc
    python -m venv target/py-bench-venv && target/py-bench-venv/bin/pip install ./client-py polars
    target/py-bench-venv/bin/python bench/python/pybench.py --out bench/results/2026-11-22-python.md

It starts its own release `busd dev --fsync always` in a fresh directory
under --work-dir and stops it at the end.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

import arrowbus

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "IBM"]
SIDES = pa.array(["B", "S"])
#: Acks a benchmark loop keeps outstanding (Python and Rust alike); the
#: producer window (5 batches per partition) is the real bound.
MAX_PENDING = 64
#: Distinct batches in the frames file; the loops cycle over them.
DISTINCT_BATCHES = 32
PARTITIONS = 4
VARIANTS = (
    "rust",
    "python 1 thread",
    "python 4 threads",
    "python 1 thread blocking",
    "python 4 threads blocking",
)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def tick_batch(rows: int, seed: int) -> pa.RecordBatch:
    """busbench's tick schema: timestamp (µs, UTC), symbol, price, size, side."""
    base = 1_790_000_000_000_000 + seed * rows
    return pa.record_batch(
        {
            "timestamp": pa.array(range(base, base + rows), pa.timestamp("us", tz="UTC")),
            "symbol": pa.array([SYMBOLS[(seed + i) % 8] for i in range(rows)], pa.string()),
            "price": pa.array([100.0 + ((seed * 7 + i) % 1000) / 100 for i in range(rows)]),
            "size": pa.array([(seed + i) % 500 for i in range(rows)], pa.int64()),
            # One dictionary for every batch (an IPC file allows no replacement).
            "side": pa.DictionaryArray.from_arrays(
                pa.array([(seed + i) % 2 for i in range(rows)], pa.int8()), SIDES
            ),
        }
    )


def ipc_body_bytes(batch: pa.RecordBatch) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    schema_only = pa.BufferOutputStream()
    with pa.ipc.new_stream(schema_only, batch.schema):
        pass
    return sink.getvalue().size - schema_only.getvalue().size


def rows_for_bytes(target: int) -> int:
    probe = tick_batch(4096, 0)
    return max(1, int(target / (ipc_body_bytes(probe) / 4096)))


def write_frames(path: Path, rows: int) -> list[pa.RecordBatch]:
    batches = [tick_batch(rows, s) for s in range(DISTINCT_BATCHES)]
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, batches[0].schema) as w:
        for b in batches:
            w.write_batch(b)
    # Both producers read the same file.
    with pa.memory_map(str(path)) as m:
        return list(pa.ipc.open_file(m).read_all().to_batches())


class Busd:
    def __init__(self, binary: Path, root: Path) -> None:
        self.root = root
        self.config_dir = root / "config"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [str(binary), "dev", "--data-dir", str(root / "data"), "--listen", f"127.0.0.1:{self.port}",
             "--fsync", "always"],
            env=dict(os.environ, ARROWBUS_CONFIG_DIR=str(self.config_dir)),
            stdout=open(root / "busd.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not (self.config_dir / "profile.toml").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"busd did not start: {(root / 'busd.log').read_text()}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def topic_bytes(bus: arrowbus.Client, topic: str) -> tuple[int, int]:
    """Bytes stored and rows stored. Rows, not `batches`: a partition's
    batch count includes its Raft bookkeeping entries (two per new
    single-node partition), rows count data only."""
    info = bus.admin.describe_topic(topic)
    return sum(p.bytes for p in info.partitions), info.rows


def publish_python(bus, topic: str, batches: list, repeat: int, threads: int, blocking: bool = False) -> float:
    """Publish every batch `repeat` times from `threads` threads. Pipelined:
    each thread keeps MAX_PENDING // threads acks outstanding (`send`).
    Blocking: each thread calls `publish` and waits for its ack before the
    next batch, the loop most applications write; one thread is then bound
    by the publish round trip (fsync included), not by a CPU, so this is the
    case where threads can scale on a 2-core machine."""
    producer = bus.producer()
    shares = [batches[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def work(share: list) -> None:
        try:
            if blocking:
                for _ in range(repeat):
                    for b in share:
                        producer.publish(topic, b)
                return
            pending: collections.deque = collections.deque()
            for _ in range(repeat):
                for b in share:
                    pending.append(producer.send(topic, b))
                    while len(pending) > MAX_PENDING // threads:
                        pending.popleft().result()
            while pending:
                pending.popleft().result()
        except BaseException as e:  # reported after the run
            errors.append(e)

    start = time.perf_counter()
    if threads == 1:
        work(shares[0])
    else:
        ts = [threading.Thread(target=work, args=(s,)) for s in shares]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    secs = time.perf_counter() - start
    if errors:
        raise errors[0]
    return secs


def run_rust(bench_bin: Path, env: dict, args: list[str]) -> dict:
    out = subprocess.run([str(bench_bin), *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_ipc {args} failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def subscribe_python(bus, topic: str) -> tuple[float, int, int]:
    start = time.perf_counter()
    batches = rows = 0
    for b in bus.subscribe(topic, start="earliest", until_end=True):
        rb = b.to_pyarrow()  # what an application does with it (no copy)
        batches += 1
        rows += rb.num_rows
    return time.perf_counter() - start, batches, rows


def memory_run(bus, busd: Busd, gb: float, batch: pa.RecordBatch, log: list[str]) -> dict:
    topic = f"mem-{uuid.uuid4().hex[:6]}"
    bus.admin.create_topic(topic, partitions=PARTITIONS)
    body = ipc_body_bytes(batch)
    n = int(gb * 1e9 / body)
    samples: list[tuple[float, float, float]] = []  # (t, python rss, busd rss)
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_mib(), busd.rss_mib()))
            done.wait(0.5)

    def frames():
        for _ in range(n):
            yield batch  # the same Arrow memory each time: growth would be the client's

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    reader = pa.RecordBatchReader.from_batches(batch.schema, frames())
    ack = bus.producer().publish(topic, reader)  # one call, 10 GB streamed through it
    secs = time.perf_counter() - start
    done.set()
    sampler.join()
    stored, _ = topic_bytes(bus, topic)
    bus.admin.delete_topic(topic)
    assert ack.rows == n * batch.num_rows, ack
    rss = [s[1] for s in samples]
    q = lambda f: rss[min(len(rss) - 1, int(f * (len(rss) - 1)))]  # noqa: E731
    return {
        "batches": n, "gb": stored / 1e9, "seconds": secs, "mb_s": stored / secs / 1e6,
        "rss_start": rss[0], "rss_25": q(0.25), "rss_50": q(0.5), "rss_75": q(0.75), "rss_end": rss[-1],
        "rss_peak": max(rss), "busd_peak": max(s[2] for s in samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busd", default=str(REPO / "target/release/busd"))
    ap.add_argument("--bench-bin", default=str(REPO / "target/release/examples/bench_ipc"))
    ap.add_argument("--work-dir", default=tempfile.gettempdir())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--small-batches", type=int, default=12_800, help="1,000-row batches per run")
    ap.add_argument("--large-batches", type=int, default=1_280, help="~1 MiB batches per run")
    ap.add_argument("--gb", type=float, default=10.0, help="GB published in the memory run (0: skip)")
    ap.add_argument("--out", default=None, help="markdown report path")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pybench-", dir=args.work_dir))
    log: list[str] = []
    def say(s: str) -> None:
        print(s, flush=True)
        log.append(s)

    say(f"# Python client benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    say("")
    say(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    say(f"commit {commit} + working tree; {platform.platform()}; {os.cpu_count()} CPUs; Python {platform.python_version()}, pyarrow {pa.__version__}")
    say(f"busd: {args.busd} (release, `dev --fsync always`), data under {work}")
    say(f"load before: `{load()}`")
    say("")
    busd = Busd(Path(args.busd), work)
    env = dict(os.environ, ARROWBUS_CONFIG_DIR=str(busd.config_dir))
    os.environ["ARROWBUS_CONFIG_DIR"] = str(busd.config_dir)
    bus = arrowbus.connect()
    try:
        sizes = [("1,000 rows", 1000, args.small_batches), ("~1 MiB", rows_for_bytes(1024 * 1024), args.large_batches)]
        results: dict = {}
        cpu_per_batch: dict = {}
        sub_results: list = []
        for label, rows, total in sizes:
            path = work / f"frames-{rows}.arrow"
            batches = write_frames(path, rows)
            repeat = max(1, total // len(batches))
            body = ipc_body_bytes(batches[0])
            say(f"## {label}: {rows} rows, {body:,} B IPC body per batch; {len(batches) * repeat} batches per run")
            say("")
            say("| round | variant | seconds | batches/s | MB/s stored | rows/s | client CPU s | busd CPU s | load (1 min) |")
            say("|---|---|---|---|---|---|---|---|---|")
            for rnd in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    topic = f"b-{uuid.uuid4().hex[:8]}"
                    bus.admin.create_topic(topic, partitions=PARTITIONS)
                    cpu0, ccpu0, bcpu0 = own_cpu(), children_cpu(), busd.cpu_seconds()
                    blocking = variant.endswith("blocking")
                    # Blocking loops run a quarter of the batches: one round trip each.
                    rep = max(1, repeat // 4) if blocking else repeat
                    if variant == "rust":
                        r = run_rust(Path(args.bench_bin), env, ["publish", str(path), topic, str(MAX_PENDING), str(repeat)])
                        secs, client_cpu = r["seconds"], children_cpu() - ccpu0
                    else:
                        secs = publish_python(bus, topic, batches, rep, 1 if "1 thread" in variant else 4, blocking)
                        client_cpu = own_cpu() - cpu0
                    busd_cpu = busd.cpu_seconds() - bcpu0
                    stored, stored_rows = topic_bytes(bus, topic)
                    n = len(batches) * rep
                    # Exactly once: no publish lost, none stored twice.
                    assert stored_rows == n * rows, (variant, stored_rows, n * rows)
                    results.setdefault((label, variant), []).append(n / secs)
                    cpu_per_batch.setdefault((label, variant), []).append(client_cpu / n * 1e6)
                    la = os.getloadavg()[0]
                    say(f"| {rnd} | {variant} | {secs:.2f} | {n / secs:,.0f} | {stored / secs / 1e6:,.0f} | {n * rows / secs:,.0f} | {client_cpu:.1f} | {busd_cpu:.1f} | {la:.2f} |")
                    if variant == "python 1 thread" and rnd == 1:
                        # Subscriber rates on this topic, Python and Rust side by side.
                        for who in ("python", "rust", "python"):
                            if who == "python":
                                s, b_, r_ = subscribe_python(bus, topic)
                            else:
                                rr = run_rust(Path(args.bench_bin), env, ["subscribe", topic])
                                s, b_, r_ = rr["seconds"], rr["batches"], rr["rows"]
                            assert b_ == n and r_ == n * rows, (who, b_, r_)
                            sub_results.append((label, who, s, b_, r_, stored, os.getloadavg()[0]))
                    bus.admin.delete_topic(topic)
            say("")
        say("### Medians (batches/s) and ratios")
        say("")
        say("| batch | rust | python 1 thread | python 4 threads | python 1t / rust | 4t / 1t |")
        say("|---|---|---|---|---|---|")
        def medians(table: dict, label: str, *variants: str) -> list[float]:
            return [statistics.median(table[(label, v)]) for v in variants]

        for label, _, _ in sizes:
            r, p1, p4 = medians(results, label, "rust", "python 1 thread", "python 4 threads")
            say(f"| {label} | {r:,.0f} | {p1:,.0f} | {p4:,.0f} | {p1 / r:.0%} | {p4 / p1:.2f}x |")
        say("")
        say("### Thread scaling with blocking `publish` (one batch in flight per thread; medians, batches/s)")
        say("")
        say("| batch | 1 thread | 4 threads | 4t / 1t |")
        say("|---|---|---|---|")
        for label, _, _ in sizes:
            b1, b4 = medians(results, label, "python 1 thread blocking", "python 4 threads blocking")
            say(f"| {label} | {b1:,.0f} | {b4:,.0f} | {b4 / b1:.2f}x |")
        say("")
        say("### Client CPU per batch (median µs; robust to wall-clock noise: what a batch costs the producer process)")
        say("")
        say("| batch | rust | python 1 thread | python 4 threads | rust / python 1t (throughput if client-CPU-bound) |")
        say("|---|---|---|---|---|")
        for label, _, _ in sizes:
            r, p1, p4 = medians(cpu_per_batch, label, "rust", "python 1 thread", "python 4 threads")
            say(f"| {label} | {r:,.0f} | {p1:,.0f} | {p4:,.0f} | {r / p1:.0%} |")
        say("")
        say("### Subscriber delivery rate (from earliest to the end; Python calls `.to_pyarrow()` per batch)")
        say("")
        say("| batch | subscriber | seconds | batches/s | rows/s | MB/s | load (1 min) |")
        say("|---|---|---|---|---|---|---|")
        for label, who, s, b_, r_, stored, la in sub_results:
            say(f"| {label} | {who} | {s:.2f} | {b_ / s:,.0f} | {r_ / s:,.0f} | {stored / s / 1e6:,.0f} | {la:.2f} |")
        say("")
        if args.gb > 0:
            big = [b for b in write_frames(work / "mem.arrow", rows_for_bytes(1024 * 1024))][0]
            say(f"### Memory while publishing {args.gb:g} GB (one `publish` of a RecordBatchReader over a generator of ~1 MiB batches)")
            say("")
            say(f"load before: `{load()}`")
            m = memory_run(bus, busd, args.gb, big, log)
            say("")
            say("| GB stored | seconds | MB/s | Python RSS MiB: start / 25% / 50% / 75% / end / peak | busd peak RSS MiB |")
            say("|---|---|---|---|---|")
            say(f"| {m['gb']:.2f} | {m['seconds']:.1f} | {m['mb_s']:,.0f} | {m['rss_start']:.0f} / {m['rss_25']:.0f} / {m['rss_50']:.0f} / {m['rss_75']:.0f} / {m['rss_end']:.0f} / {m['rss_peak']:.0f} | {m['busd_peak']:.0f} |")
            say("")
        say(f"load after: `{load()}`")
    finally:
        bus.close()
        busd.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
