"""AMQP header values whatever a publisher put in them: decoded without failing, re-encodable.

The broker checks a header table's structure when it is published, but not its depth nor
whether its strings are UTF-8. pamqp, under aio-pika, decodes tables recursively and raises
on a key or short string that is not UTF-8, on a timestamp no `datetime` holds, and with
`RecursionError` on a table nested a few thousand levels deep. Any of these fails the whole
connection: every message in flight on it is redelivered and spends a delivery, so one
publisher's message could dead-letter everyone's. `install()` replaces pamqp's decoders of
tables, arrays, short strings and timestamps with ones that never raise on such content:

- a table or array nested deeper than `MAX_DEPTH` levels is skipped by its length prefix
  and stands as a string saying so;
- bytes that are not UTF-8, in keys and strings, are kept as backslash escapes (`\\xff`);
- a timestamp outside `datetime`'s range is None.

`encodable()` turns decoded headers into a table pamqp can encode again (the worker copies a
message's headers when it dead-letters it), replacing what cannot be encoded with a string
describing it.
"""

import datetime
import decimal
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final

from pamqp import common, decode, encode

MAX_DEPTH: Final = 32
_MAX_SHORT_STRING_BYTES: Final = 255

_Decoder = Callable[[bytes, int], tuple[Any, int]]


def _undecodable(what: str, size: int) -> str:
    return f"<{what} nested deeper than {MAX_DEPTH} levels: {size} bytes, not decoded>"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _short_string(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    return _text(data[offset + 1 : offset + 1 + length]), offset + 1 + length


def _long_string(data: bytes, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">I", data, offset)
    start = offset + 4
    return _text(data[start : start + length]), start + length


def _byte_array(data: bytes, offset: int) -> tuple[bytearray, int]:
    (length,) = struct.unpack_from(">I", data, offset)
    start = offset + 4
    return bytearray(data[start : start + length]), start + length


def _timestamp(data: bytes, offset: int) -> tuple[datetime.datetime | None, int]:
    (seconds,) = struct.unpack_from(">Q", data, offset)
    if seconds > 0xFFFFFFFF:  # pamqp's rule: past the year 2106 it is likely milliseconds
        seconds /= 1000.0
    try:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC), offset + 8
    except (OverflowError, ValueError, OSError):
        return None, offset + 8


def _decimal(data: bytes, offset: int) -> tuple[decimal.Decimal, int]:
    scale, raw = struct.unpack_from(">BI", data, offset)
    return decimal.Decimal(raw).scaleb(-scale), offset + 5


def _fixed(fmt: str) -> _Decoder:
    size = struct.calcsize(fmt)

    def read(data: bytes, offset: int) -> tuple[Any, int]:
        return struct.unpack_from(fmt, data, offset)[0], offset + size

    return read


_SCALARS: Final[dict[int, _Decoder]] = {
    ord("t"): lambda data, offset: (data[offset] != 0, offset + 1),
    ord("b"): _fixed(">b"),
    ord("B"): _fixed(">B"),
    ord("s"): _fixed(">h"),
    ord("u"): _fixed(">H"),
    ord("I"): _fixed(">i"),
    ord("i"): _fixed(">I"),
    ord("l"): _fixed(">q"),
    ord("L"): _fixed(">q"),
    ord("f"): _fixed(">f"),
    ord("d"): _fixed(">d"),
    ord("D"): _decimal,
    ord("S"): _long_string,
    ord("T"): _timestamp,
    ord("x"): _byte_array,
    ord("V"): lambda _, offset: (None, offset),
    0: lambda _, offset: (None, offset),
}


def _value(data: bytes, offset: int, depth: int) -> tuple[Any, int]:
    kind = data[offset]
    offset += 1
    if kind == ord("F"):
        return _table(data, offset, depth + 1)
    if kind == ord("A"):
        return _array(data, offset, depth + 1)
    scalar = _SCALARS.get(kind)
    if scalar is None:
        # The broker refuses unknown types at publish; should one arrive, nothing after it
        # in its table can be found, so the caller stops there.
        raise ValueError(f"unknown field type {bytes([kind])!r}")
    return scalar(data, offset)


def _table(data: bytes, offset: int, depth: int) -> tuple[Any, int]:
    (length,) = struct.unpack_from(">I", data, offset)
    start, end = offset + 4, offset + 4 + length
    if depth > MAX_DEPTH:
        return _undecodable("table", length), end
    table: dict[str, Any] = {}
    position = start
    try:
        while position < end:
            key, position = _short_string(data, position)
            table[key], position = _value(data, position, depth)
    except (ValueError, IndexError, struct.error):
        table["<undecodable>"] = f"{end - position} bytes not decoded"
    return table, end


def _array(data: bytes, offset: int, depth: int) -> tuple[Any, int]:
    (length,) = struct.unpack_from(">I", data, offset)
    start, end = offset + 4, offset + 4 + length
    if depth > MAX_DEPTH:
        return _undecodable("array", length), end
    items: list[Any] = []
    position = start
    try:
        while position < end:
            item, position = _value(data, position, depth)
            items.append(item)
    except (ValueError, IndexError, struct.error):
        items.append(f"<{end - position} bytes not decoded>")
    return items, end


def _consumed(decoder: _Decoder) -> Callable[[bytes], tuple[int, Any]]:
    """pamqp's calling convention: the data from the value on, answered (bytes used, value)."""

    def decode_from_start(value: bytes) -> tuple[int, Any]:
        result, used = decoder(value, 0)
        return used, result

    return decode_from_start


def install() -> None:
    """Make pamqp (and so aio-pika) decode every header table and property without raising.

    Idempotent; called before a process consumes or inspects messages.
    """
    table = _consumed(lambda data, offset: _table(data, offset, 1))
    array = _consumed(lambda data, offset: _array(data, offset, 1))
    decode.METHODS.update(
        {
            "table": table,
            "array": array,
            "shortstr": _consumed(_short_string),
            "timestamp": _consumed(_timestamp),
        }
    )
    decode.TABLE_MAPPING.update({b"F": table, b"A": array})


def encodable(headers: Mapping[str, Any] | None) -> dict[str, common.FieldValue]:
    """Headers pamqp can encode: each value that cannot be is replaced by a description."""
    table: dict[str, common.FieldValue] = {}
    for key, value in (headers or {}).items():
        name = key if len(key.encode()) <= _MAX_SHORT_STRING_BYTES else _truncated(key)
        try:
            encode.field_table({name: value})
        except (TypeError, ValueError, OverflowError, struct.error, decimal.InvalidOperation):
            table[name] = describe(value)
        else:
            table[name] = value
    return table


def describe(value: Any) -> str:
    """A header value as printable text; bytes as backslash escapes."""
    if isinstance(value, bytes | bytearray):
        return _text(bytes(value))
    return repr(value)


def _truncated(key: str) -> str:
    return key.encode()[: _MAX_SHORT_STRING_BYTES - 3].decode(errors="ignore") + "..."
