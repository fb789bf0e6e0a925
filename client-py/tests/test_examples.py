"""The README's Python examples run as a user runs them: as scripts,
against a `busd dev` whose profile they find on their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import Busd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(busd: Busd, *args: str) -> str:
    env = dict(os.environ, ARROWBUS_CONFIG_DIR=str(busd.config_dir))
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"{args[0]} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_publish_polars_then_subscribe_async_read_back_every_row(busd: Busd, topic: str) -> None:
    published = run_example(busd, "publish_polars.py", topic)
    assert f"created topic {topic}" in published
    m = re.search(r"partition (\d+) offsets (\d+)\.\.(\d+)", published)
    assert m, published
    first, end = int(m.group(2)), int(m.group(3))
    assert end - first == 6

    # A second run publishes to the existing topic: 12 rows in all.
    again = run_example(busd, "publish_polars.py", topic)
    assert "created topic" not in again

    read = run_example(busd, "subscribe_async.py", topic)
    assert read.strip().splitlines()[-1] == "12 rows", read
    # Every frame the script printed carries the example's symbols.
    for symbol in ("AAPL", "MSFT", "NVDA"):
        assert symbol in read


def test_subscribe_async_names_a_missing_topic(busd: Busd, topic: str) -> None:
    env = dict(os.environ, ARROWBUS_CONFIG_DIR=str(busd.config_dir))
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "subscribe_async.py"), topic],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "subscribe_async:" in out.stderr and topic in out.stderr, out.stderr
