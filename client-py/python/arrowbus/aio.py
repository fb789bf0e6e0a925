"""arrowbus for asyncio: the same client, every wait an ``await``.

It runs on the same runtime as the blocking API (no thread or event loop per
call): each call returns a future that the client's runtime completes on
your event loop. A full producer window suspends ``await producer.publish``
or ``await producer.send`` (backpressure); a subscription fetches nothing
ahead beyond its credit. Cancelling a task stops its waits (a subscription's
next batch stays in place for the next ``__anext__``); a frame already handed
to ``publish``/``send`` is still published, only its outcome goes
unreported::

    import arrowbus.aio

    async def main():
        bus = await arrowbus.aio.connect()
        ack = await bus.producer().publish("ticks", table)
        async for batch in bus.subscribe("ticks", start="earliest"):
            print(batch.partition, batch.offset, batch.to_pyarrow())
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from . import _arrowbus
from ._arrowbus import Ack, Batch, TopicInfo

__all__ = ["connect", "Client", "Admin", "Producer", "PendingAck", "Subscription"]


async def connect(
    broker: Optional[str] = None,
    *,
    ca: Union[str, "os.PathLike[str]", None] = None,
    server_name: Optional[str] = None,
    timeout: Optional[float] = None,
) -> "Client":
    """Connect to a broker; arguments as :func:`arrowbus.connect`."""
    native = await _arrowbus.connect_async(
        broker, os.fspath(ca) if ca is not None else None, server_name, timeout
    )
    return Client(native)


class Client:
    """One connection to a broker, for asyncio. Share it between tasks."""

    def __init__(self, native: _arrowbus.Client) -> None:
        self._native = native
        self.admin = Admin(native.admin)

    @property
    def native(self) -> _arrowbus.Client:
        """The blocking client on the same connection."""
        return self._native

    def producer(
        self,
        *,
        linger_ms: float = 0.0,
        linger_bytes: int = 1024 * 1024,
        max_inflight_batches: int = 5,
    ) -> "Producer":
        """A producer; options as :meth:`arrowbus.Client.producer`."""
        return Producer(
            self._native.producer(linger_ms, linger_bytes, max_inflight_batches)
        )

    def subscribe(
        self,
        topic: str,
        *,
        start: Any = "latest",
        partitions: Optional[list[int]] = None,
        until_end: bool = False,
        credit_bytes: int = 8 * 1024 * 1024,
        credit_batches: int = 256,
    ) -> "Subscription":
        """A subscription, opened on first use (``async for`` or ``async with``).

        Options as :meth:`arrowbus.Client.subscribe`.
        """
        return Subscription(
            self._native,
            topic,
            dict(
                start=start,
                partitions=partitions,
                until_end=until_end,
                credit_bytes=credit_bytes,
                credit_batches=credit_batches,
            ),
        )

    async def close(self) -> None:
        """Close the connection (await outstanding acks first)."""
        self._native.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Admin:
    """Topic administration, for asyncio."""

    def __init__(self, native: _arrowbus.Admin) -> None:
        self._native = native

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        schema: Any = None,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
    ) -> TopicInfo:
        """Create a topic; see :meth:`arrowbus.Admin.create_topic`."""
        return await self._native.create_topic_async(
            name, partitions, schema, replication_factor, retention_ms, retention_bytes
        )

    async def list_topics(self) -> list[TopicInfo]:
        return await self._native.list_topics_async()

    async def describe_topic(self, name: str) -> TopicInfo:
        return await self._native.describe_topic_async(name)

    async def delete_topic(self, name: str) -> None:
        await self._native.delete_topic_async(name)


class PendingAck:
    """A publish in flight: ``await`` it for its :class:`arrowbus.Ack`."""

    def __init__(self, native: _arrowbus.PendingAck) -> None:
        self._native = native

    def done(self) -> bool:
        return self._native.done()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._native.result_async().__await__()


class Producer:
    """Publishes Arrow data, for asyncio; see :class:`arrowbus.Producer`."""

    def __init__(self, native: _arrowbus.Producer) -> None:
        self._native = native

    async def publish(self, topic: str, data: Any, partition: Optional[int] = None) -> Ack:
        """Publish ``data`` and wait until it is durable. Suspends while the
        producer window is full."""
        return await self._native.publish_async(topic, data, partition)

    async def send(self, topic: str, data: Any, partition: Optional[int] = None) -> PendingAck:
        """Put ``data`` in flight; returns once it is admitted to the window.
        ``await`` the result for the ack."""
        return PendingAck(await self._native.send_async(topic, data, partition))

    async def flush(self) -> None:
        """Send what linger holds and wait until everything sent is acked."""
        await self._native.flush_async()


class Subscription:
    """Batches of a topic, for ``async for``; see :class:`arrowbus.Subscription`."""

    def __init__(self, client: _arrowbus.Client, topic: str, options: dict[str, Any]) -> None:
        self._client = client
        self._topic = topic
        self._options = options
        self._native: Optional[_arrowbus.Subscription] = None

    async def open(self) -> "Subscription":
        """Subscribe now (otherwise the first ``__anext__`` does)."""
        if self._native is None:
            self._native = await self._client.subscribe_async(self._topic, **self._options)
        return self

    @property
    def native(self) -> Optional[_arrowbus.Subscription]:
        return self._native

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Batch:
        await self.open()
        assert self._native is not None
        batch = await self._native.next_async()
        if batch is None:
            raise StopAsyncIteration
        return batch

    async def close(self) -> None:
        if self._native is not None:
            self._native.close()

    async def __aenter__(self) -> "Subscription":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
