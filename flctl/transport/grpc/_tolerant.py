"""Request decoding that never raises: an unreadable message becomes a :class:`Malformed` value.

A request deserializer that raises inside gRPC makes ``grpc.aio`` log a traceback
("Unexpected [DecodeError] raised by servicer method") and answer ``UNKNOWN``, before any flctl
code runs. The server registers every request deserializer wrapped by :func:`tolerant`
instead, so the bytes that do not parse reach the servicer as a :class:`Malformed`, which
refuses it (:func:`refuse_malformed`, or :func:`refusing_malformed` for a request stream) with
``INVALID_ARGUMENT`` and ``malformed <Type>: <reason>`` before any handler sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from flctl.core.errors import InvalidInputError

__all__ = ["Malformed", "refuse_malformed", "refusing_malformed", "tolerant"]

T = TypeVar("T")

#: How long a reason may be in the refusal (the parser's own words, never the bytes sent).
_MAX_REASON = 200


@dataclass(frozen=True)
class Malformed:
    """A request that did not decode as its message.

    Attributes:
        message_type: The protobuf message it should have been ("JoinRequest").
        reason: What the parser said ("Wire format was corrupt").
    """

    message_type: str
    reason: str

    def error(self) -> InvalidInputError:
        """The refusal: ``INVALID_ARGUMENT`` on the wire."""
        return InvalidInputError(f"malformed {self.message_type}: {self.reason}")


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # upb says "Error parsing message with type 'flctl.v1.JoinRequest': Wire format was corrupt"
    if text.startswith("Error parsing message") and ": " in text:
        text = text.rsplit(": ", 1)[1]
    return text[:_MAX_REASON]


def tolerant(decode: Callable[[bytes], T], message_type: str) -> Callable[[bytes], T | Malformed]:
    """``decode``, returning a :class:`Malformed` where it raises.

    It catches ``DecodeError`` (the generated parsers) and ``ValueError`` (the hand-framed
    decoders' way to say the same); anything else is a bug and still raises.
    """

    def decode_or_malformed(raw: bytes) -> T | Malformed:
        try:
            return decode(raw)
        except (DecodeError, ValueError) as exc:
            return Malformed(message_type, _reason(exc))

    decode_or_malformed.__name__ = f"tolerant_{getattr(decode, '__name__', 'decode')}"
    return decode_or_malformed


def refuse_malformed(request: object) -> None:
    """Raise :class:`InvalidInputError` if ``request`` did not decode.

    Raises:
        InvalidInputError: ``malformed <Type>: <reason>``.
    """
    if isinstance(request, Malformed):
        raise request.error()


class _Refusing(AsyncIterator[T]):
    """A request stream that raises at the first :class:`Malformed` message it would yield.

    It starts reading ``items`` only when first asked (a handler refusing the call before it
    reads leaves gRPC's receiver untouched, as without the wrapper).
    """

    __slots__ = ("_items", "_iterator")

    def __init__(self, items: AsyncIterable[Any]) -> None:
        self._items = items
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _Refusing[T]:
        return self

    async def __anext__(self) -> T:
        if self._iterator is None:
            self._iterator = aiter(self._items)
        item = await anext(self._iterator)
        if isinstance(item, Malformed):
            raise item.error()
        result: T = item
        return result


def refusing_malformed(items: AsyncIterable[T | Malformed]) -> AsyncIterator[T]:
    """``items`` as they come (no copy), refusing a :class:`Malformed` one.

    Raises:
        InvalidInputError: Where the consumer reaches a :class:`Malformed` message.
    """
    return _Refusing(items)
