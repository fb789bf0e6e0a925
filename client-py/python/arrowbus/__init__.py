"""arrowbus: a pub/sub bus for Arrow data (pyarrow, polars, pandas, ...).

Topics are durable, partitioned logs of Arrow record batches. Publish any
object that speaks the Arrow PyCapsule interface without copying it; get
batches back that export to pyarrow, polars and pandas without copying::

    import arrowbus, polars as pl

    bus = arrowbus.connect()            # the profile `busd dev` writes
    bus.admin.create_topic("ticks", partitions=3)
    ack = bus.producer().publish("ticks", pl.DataFrame({"px": [1.0, 2.0]}))
    for batch in bus.subscribe("ticks", start="earliest", until_end=True):
        df = batch.to_polars()

Blocking calls release the GIL while they encode, wait for the network or
wait for room in the producer window. :mod:`arrowbus.aio` has the same API
for asyncio, on the same runtime. Errors are :class:`arrowbus.Error`
subclasses named after the broker's stable error codes.
"""

from __future__ import annotations

import os
from importlib import metadata as _metadata
from typing import Optional, Union

from . import _errors
from ._arrowbus import (
    MAX_BATCH_BYTES,
    Ack,
    Admin,
    ArrowSchema,
    Batch,
    Client,
    PartitionInfo,
    PendingAck,
    Producer,
    Subscription,
    TopicInfo,
)
from ._arrowbus import connect as _connect
from ._errors import *  # noqa: F403 (the hierarchy is the public API)

try:
    #: The installed distribution's version (the workspace version of the crates).
    __version__ = _metadata.version("arrowbus")
except _metadata.PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "connect",
    "Client",
    "Admin",
    "Producer",
    "PendingAck",
    "Ack",
    "Subscription",
    "Batch",
    "TopicInfo",
    "PartitionInfo",
    "ArrowSchema",
    "MAX_BATCH_BYTES",
    *_errors.__all__,
]


def connect(
    broker: Optional[str] = None,
    *,
    ca: Union[str, "os.PathLike[str]", None] = None,
    server_name: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Client:
    """Connect to an arrowbus broker.

    Args:
        broker: ``"host:port"`` (or several, comma-separated; the first that
            answers is used). Default: ``$ARROWBUS_BROKER``, else the profile
            written by ``busd dev`` (``$ARROWBUS_CONFIG_DIR/profile.toml`` or
            ``~/.config/arrowbus/profile.toml``).
        ca: PEM file of the CA that signed the broker's certificate. Default:
            ``$ARROWBUS_CA``, else the profile's.
        server_name: TLS name to verify (default: the host of ``broker``).
        timeout: seconds for connecting and for each admin request (30).

    Raises:
        ConfigError: no broker given and no profile found.
        ConnectError: the broker could not be reached.
    """
    return _connect(
        broker, os.fspath(ca) if ca is not None else None, server_name, timeout
    )
