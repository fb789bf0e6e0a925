"""Fixtures: a real busd per test session, started here and stopped after.

busd is the debug build `scripts/test` makes (target/debug/busd), or the
binary named by $ARROWBUS_BUSD. Each broker gets its own temporary data
directory and ARROWBUS_CONFIG_DIR, so the user's profile is never touched.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import arrowbus

REPO = Path(__file__).resolve().parents[2]
BUSD_READY_TIMEOUT_S = 30.0


def busd_binary() -> Path:
    explicit = os.environ.get("ARROWBUS_BUSD")
    path = Path(explicit) if explicit else REPO / "target" / "debug" / "busd"
    if not path.exists():
        raise RuntimeError(
            f"busd not found at {path}: run `cargo build -p arrowbus-broker` "
            "(scripts/test does) or set ARROWBUS_BUSD"
        )
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Busd:
    """One `busd dev` process with its own data dir and config dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.config_dir = root / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "busd.log"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def profile(self) -> Path:
        return self.config_dir / "profile.toml"

    @property
    def ca(self) -> Path:
        """The CA file named in the profile busd wrote."""
        with open(self.profile, "rb") as f:
            return Path(tomllib.load(f)["ca"])

    def start(self) -> None:
        if self.profile.exists():
            self.profile.unlink()
        env = dict(os.environ, ARROWBUS_CONFIG_DIR=str(self.config_dir))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(busd_binary()),
                "dev",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                self.addr,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + BUSD_READY_TIMEOUT_S
        while not self.profile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"busd exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"busd did not write its profile in time: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def busd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busd]:
    node = Busd(tmp_path_factory.mktemp("busd"))
    node.start()
    # The profile busd wrote is what arrowbus.connect() reads by default.
    previous = os.environ.get("ARROWBUS_CONFIG_DIR")
    os.environ["ARROWBUS_CONFIG_DIR"] = str(node.config_dir)
    os.environ.pop("ARROWBUS_BROKER", None)
    os.environ.pop("ARROWBUS_CA", None)
    try:
        yield node
    finally:
        if previous is None:
            os.environ.pop("ARROWBUS_CONFIG_DIR", None)
        else:
            os.environ["ARROWBUS_CONFIG_DIR"] = previous
        code = node.stop()
        assert code == 0, f"busd exited with {code}: {node.log()}"


@pytest.fixture(scope="session")
def bus(busd: Busd) -> Iterator[arrowbus.Client]:
    client = arrowbus.connect()
    yield client
    client.close()


@pytest.fixture
def topic(bus: arrowbus.Client, request: pytest.FixtureRequest) -> str:
    """A fresh topic name (not created) per test."""
    name = f"t-{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@pytest.fixture
def seed() -> int:
    """Seed of a randomized test: $ARROWBUS_TEST_SEED replays one."""
    s = int(os.environ.get("ARROWBUS_TEST_SEED", random.randrange(2**32)))
    print(f"seed={s} (replay with ARROWBUS_TEST_SEED={s})")
    return s
