"""A program that ends while the client is still busy exits normally.

The client's runtime threads complete asyncio futures by calling into
Python. When the program ends just as one of them does, the interpreter
must not be finalizing under it: CPython ends such a thread with
`pthread_exit`, and that unwinding through Rust frames aborts the process
(exit status -6, after the program's own output). These run real scripts
as a user does, many times each, because the window is narrow: before the
fix, about one run in five of the first script aborted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Busd

RUNS = 25

# Many completions in flight; leave as soon as the first one is in.
MANY_IN_FLIGHT = """
import asyncio
import arrowbus.aio

async def main():
    bus = await arrowbus.aio.connect()
    tasks = [asyncio.ensure_future(bus.admin.list_topics()) for _ in range(64)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    print(f"done {len(done) > 0}")

asyncio.run(main())
"""

# A consumer in a daemon thread, blocked in the client, when main ends.
DAEMON_CONSUMER = """
import sys
import threading
import time
import arrowbus

topic = sys.argv[1]
bus = arrowbus.connect()
try:
    bus.admin.create_topic(topic)
except arrowbus.TopicExists:
    pass

def consume():
    for batch in bus.subscribe(topic, start="latest"):
        print(batch.num_rows)

threading.Thread(target=consume, daemon=True).start()
time.sleep(0.2)
print("done True")
"""


def run_script(busd: Busd, tmp_path: Path, source: str, *args: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, ARROWBUS_CONFIG_DIR=str(busd.config_dir))
    for i in range(RUNS):
        out = subprocess.run(
            [sys.executable, str(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (out.returncode, out.stdout.strip()) == (0, "done True"), (
            f"run {i + 1} of {RUNS} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
        )


def test_exit_while_asyncio_completions_are_in_flight(busd: Busd, tmp_path: Path) -> None:
    run_script(busd, tmp_path, MANY_IN_FLIGHT)


def test_exit_while_a_daemon_thread_waits_on_a_subscription(
    busd: Busd, tmp_path: Path, topic: str
) -> None:
    run_script(busd, tmp_path, DAEMON_CONSUMER, topic)
