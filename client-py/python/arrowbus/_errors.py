"""The arrowbus exception hierarchy.

Every error the client raises is an :class:`Error`. Errors the broker (or the
client, for the same condition) reports carry the stable wire code
(``err.code``), its name (``err.name``) and the broker's message, which says
what to do (``err.message``). Codes are never reused; see ``wire/src/error.rs``.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "BrokerError",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "TransportError",
    "ProtocolError",
    "ArrowError",
    "Internal",
    "MalformedFrame",
    "UnsupportedVersion",
    "FrameTooLarge",
    "UnexpectedMessage",
    "InvalidArgument",
    "TopicNotFound",
    "TopicExists",
    "TopicAlreadyExists",
    "PartitionNotFound",
    "InvalidTopicName",
    "TooManyTopics",
    "TooManyPartitions",
    "SchemaMismatch",
    "SchemaNotSet",
    "InvalidArrowIpc",
    "BatchTooLarge",
    "CorruptBatch",
    "UnsupportedArrowType",
    "OffsetOutOfRange",
    "TooManySubscriptions",
    "TooManyConnections",
    "CreditTooLarge",
    "StorageFull",
    "StorageError",
    "NotLeader",
    "Busy",
    "Timeout",
    "ShuttingDown",
    "Unauthorized",
    "ProducerFenced",
    "OutOfOrderSequence",
    "InvalidProducerEpoch",
]


class Error(Exception):
    """Base class of every arrowbus error.

    Attributes:
        code: the stable wire error code (int), or None for errors that
            happen on this side without one (connection, configuration).
        name: the code's name, e.g. ``"SchemaMismatch"`` ("" without a code).
        message: what went wrong and what to do, as the broker or client said it.
        leader_hint: for :class:`NotLeader`, the id of the node that leads.
    """

    code: int | None = None

    def __init__(
        self,
        message: str,
        code: int | None = None,
        name: str = "",
        leader_hint: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.name = name or (type(self).__name__ if self.code is not None else "")
        self.leader_hint = leader_hint

    def __str__(self) -> str:
        if self.code is not None:
            return f"{self.name} ({self.code}): {self.message}"
        return self.message


class BrokerError(Error):
    """An error with a wire code (from the broker, or the same check done
    by the client before sending)."""


class ClientError(Error):
    """An error on this side that has no wire code."""


class ConfigError(ClientError):
    """No broker address, an unreadable CA file or profile, a bad option."""


class ConnectError(ClientError, ConnectionError):
    """No broker could be reached."""


class TransportError(ClientError, ConnectionError):
    """The connection failed mid-request. For a publish this is
    indeterminate: the batch may or may not have been stored."""


class ProtocolError(ClientError):
    """The broker sent something this client does not understand."""


class ArrowError(ClientError):
    """Arrow data could not be imported, converted or encoded on this side."""


# One class per wire code. Grouping classes let callers catch families.
class Internal(BrokerError): code = 1
class MalformedFrame(BrokerError): code = 2
class UnsupportedVersion(BrokerError): code = 3
class FrameTooLarge(BrokerError): code = 4
class UnexpectedMessage(BrokerError): code = 5
class InvalidArgument(BrokerError, ValueError): code = 6
class TopicNotFound(BrokerError, LookupError): code = 10
class TopicExists(BrokerError): code = 11
TopicAlreadyExists = TopicExists
class PartitionNotFound(BrokerError, LookupError): code = 12
class InvalidTopicName(BrokerError, ValueError): code = 13
class TooManyTopics(BrokerError): code = 14
class TooManyPartitions(BrokerError): code = 15
class SchemaMismatch(BrokerError): code = 20
class SchemaNotSet(BrokerError): code = 21
class InvalidArrowIpc(BrokerError): code = 22
class BatchTooLarge(BrokerError): code = 23
class CorruptBatch(BrokerError): code = 24
class UnsupportedArrowType(BrokerError): code = 25
class OffsetOutOfRange(BrokerError): code = 30
class TooManySubscriptions(BrokerError): code = 31
class TooManyConnections(BrokerError): code = 32
class CreditTooLarge(BrokerError): code = 33
class StorageFull(BrokerError): code = 40
class StorageError(BrokerError): code = 41
class NotLeader(BrokerError): code = 50
class Busy(BrokerError): code = 51
class Timeout(BrokerError, TimeoutError): code = 52
class ShuttingDown(BrokerError): code = 53
class Unauthorized(BrokerError, PermissionError): code = 60
class ProducerFenced(BrokerError): code = 70
class OutOfOrderSequence(BrokerError): code = 71
class InvalidProducerEpoch(BrokerError): code = 72

_BY_CODE: dict[int, type[BrokerError]] = {
    cls.code: cls  # type: ignore[misc]
    for cls in BrokerError.__subclasses__()
    if isinstance(cls.__dict__.get("code"), int)
}

_BY_KIND: dict[str, type[Error]] = {
    "config": ConfigError,
    "connect": ConnectError,
    "transport": TransportError,
    "protocol": ProtocolError,
    "arrow": ArrowError,
}


def _make(
    kind: str,
    code: int | None,
    name: str,
    message: str,
    leader_hint: int | None,
) -> Error:
    """Called by the native module to build the exception for an error."""
    if code is not None:
        cls: type[Error] = _BY_CODE.get(code, BrokerError)
        return cls(message, code=code, name=name, leader_hint=leader_hint)
    return _BY_KIND.get(kind, ClientError)(message)


# Shown as `arrowbus.SchemaMismatch` in tracebacks, where users import them.
for _cls in [Error, *[c for c in list(globals().values()) if isinstance(c, type) and issubclass(c, Error)]]:
    _cls.__module__ = "arrowbus"
del _cls
