"""Header tables from any publisher decode without raising and can be encoded again."""

import struct
from decimal import Decimal
from typing import Any

from pamqp import decode, encode

from shared import field_tables


def _table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def _nested(levels: int) -> bytes:
    inner = b""
    for _ in range(levels):
        inner = b"\x01kF" + _table(inner)
    return _table(inner)


def _decoded(raw: bytes) -> dict[str, Any]:
    field_tables.install()
    used, table = decode.by_type(raw, "table")
    assert used == len(raw)
    assert isinstance(table, dict)
    return table


def test_a_table_nested_thousands_of_levels_deep_stops_at_the_limit() -> None:
    raw = _nested(3000)
    table = _decoded(raw)
    depth = 0
    value: object = table
    while isinstance(value, dict):
        value = value["k"]
        depth += 1
    assert depth == field_tables.MAX_DEPTH
    assert isinstance(value, str)
    assert "not decoded" in value
    encode.field_table(field_tables.encodable(table))


def test_an_array_nested_deeper_than_the_limit_is_described() -> None:
    inner = b""
    for _ in range(100):
        inner = b"A" + _table(inner)
    table = _decoded(_table(b"\x01a" + inner))
    value: object = table["a"]
    depth = 1  # the headers table itself
    while isinstance(value, list) and value:
        value = value[0]
        depth += 1
    assert isinstance(value, str)
    assert depth == field_tables.MAX_DEPTH


def test_bytes_that_are_not_utf8_become_escapes_in_keys_and_strings() -> None:
    raw = _table(b"\x02\xff\xfeS" + struct.pack(">I", 3) + b"a\xffb")
    assert _decoded(raw) == {"\\xff\\xfe": "a\\xffb"}


def test_a_timestamp_no_datetime_holds_is_none() -> None:
    raw = _table(b"\x02tsT" + struct.pack(">Q", 2**63))
    assert _decoded(raw) == {"ts": None}


def test_short_string_properties_that_are_not_utf8_are_escaped() -> None:
    field_tables.install()
    used, value = decode.by_type(b"\x02\xc3\x28", "shortstr")
    assert (used, value) == (3, "\\xc3(")


def test_what_cannot_be_encoded_is_described_and_the_rest_kept() -> None:
    headers = {
        "raw": b"\xff\x01",
        "kept": "text",
        "huge": 2**70,
        "decimal": Decimal(4294967295).scaleb(-5),
        "k" * 300: 1,
    }
    table = field_tables.encodable(headers)
    encode.field_table(table)
    assert table["raw"] == "\\xff\x01"
    assert table["kept"] == "text"
    assert table["huge"] == str(2**70)
    assert table["decimal"] == "Decimal('42949.67295')"
    assert ("k" * 252 + "...") in table
