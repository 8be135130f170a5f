"""Message signatures (shared/signing.py): what verifies, what never does, and the keys table.

The unit tests check signatures against an HMAC computed here from the documented recipe
(HMAC-SHA256 of `type + "\\n" + body` under the key's secret), not against the module's own
helper. The database tests each get a database of their own: they migrate, drop tables and
rotate keys, which must not touch the session's database that the api and worker tests use.
"""

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE
from shared.db import create_database_if_missing, migrate
from shared.signing import (
    KEYS_KEPT,
    READ_SECONDS,
    KeyRing,
    SigningKey,
    is_signed,
    list_keys,
    new_key,
    newest_keys,
    rotate,
)
from tests.support.processes import free_port
from tests.support.services import scratch_database
from tests.support.tcp_proxy import TcpProxy

BODY = b'{"score_id": "0192f0b4-6b7e-7c2a-9f3e-1a2b3c4d5e6f", "value": {"ok": true}}'
KEY = SigningKey("msk_0123456789abcdef", bytes(range(32)))
OTHER = SigningKey("msk_fedcba9876543210", bytes(range(100, 132)))
KEYS = {KEY.key_id: KEY}


def expected_signature(key: SigningKey, message_type: str, body: bytes) -> str:
    """The header value as documented: `<key_id>.<hex HMAC-SHA256(secret, type \\n body)>`."""
    digest = hmac.new(key.secret, message_type.encode() + b"\n" + body, hashlib.sha256)
    return f"{key.key_id}.{digest.hexdigest()}"


# Signing and verifying


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        b"",
        '{"text": "h\u00e9llo \u2713 \U0001f389"}'.encode(),
        b"\x00\xff\xfe not even UTF-8",
        b"x" * 300_000,
    ],
    ids=["score", "empty", "unicode", "binary", "large"],
)
@pytest.mark.parametrize("message_type", [MESSAGE_TYPE, BATCH_MESSAGE_TYPE])
def test_a_signature_is_the_documented_hmac_and_verifies(message_type: str, body: bytes) -> None:
    signature = KEY.sign(message_type, body)

    assert signature == expected_signature(KEY, message_type, body)
    key_id, _, digest = signature.partition(".")
    assert key_id == KEY.key_id
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    assert is_signed(KEYS, message_type, body, signature)


def test_a_signature_verifies_under_any_known_key_not_only_the_newest() -> None:
    keys = {KEY.key_id: KEY, OTHER.key_id: OTHER}
    assert is_signed(keys, MESSAGE_TYPE, BODY, OTHER.sign(MESSAGE_TYPE, BODY))
    assert is_signed(keys, MESSAGE_TYPE, BODY, KEY.sign(MESSAGE_TYPE, BODY))


def test_a_key_id_containing_dots_still_verifies() -> None:
    dotted = SigningKey("msk.with.dots", bytes(32))
    signature = dotted.sign(MESSAGE_TYPE, BODY)
    assert is_signed({dotted.key_id: dotted}, MESSAGE_TYPE, BODY, signature)


@pytest.mark.parametrize(
    "body",
    [
        BODY.replace(b"true", b"false"),
        BODY + b" ",
        BODY[:-1],
        BODY[1:],
        b"",
        BODY.upper(),
    ],
    ids=["changed-value", "appended", "truncated", "first-byte-gone", "empty", "other-case"],
)
def test_a_tampered_body_does_not_verify(body: bytes) -> None:
    assert body != BODY
    assert not is_signed(KEYS, MESSAGE_TYPE, body, KEY.sign(MESSAGE_TYPE, BODY))


@pytest.mark.parametrize(
    ("signed_as", "checked_as"),
    [
        (MESSAGE_TYPE, BATCH_MESSAGE_TYPE),
        (BATCH_MESSAGE_TYPE, MESSAGE_TYPE),
        (MESSAGE_TYPE, ""),
        (MESSAGE_TYPE, MESSAGE_TYPE + "\n"),
    ],
    ids=["single-as-batch", "batch-as-single", "untyped", "type-with-newline"],
)
def test_a_signature_does_not_verify_for_another_message_type(
    signed_as: str, checked_as: str
) -> None:
    assert not is_signed(KEYS, checked_as, BODY, KEY.sign(signed_as, BODY))


def test_a_signature_under_an_unknown_key_does_not_verify() -> None:
    signature = OTHER.sign(MESSAGE_TYPE, BODY)
    assert is_signed({OTHER.key_id: OTHER}, MESSAGE_TYPE, BODY, signature)
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, signature)
    assert not is_signed({}, MESSAGE_TYPE, BODY, KEY.sign(MESSAGE_TYPE, BODY))


def test_a_known_key_id_with_the_digest_of_another_key_does_not_verify() -> None:
    keys = {KEY.key_id: KEY, OTHER.key_id: OTHER}
    other_digest = OTHER.sign(MESSAGE_TYPE, BODY).rpartition(".")[2]
    assert not is_signed(keys, MESSAGE_TYPE, BODY, f"{KEY.key_id}.{other_digest}")
    # A key with KEY's id but another secret is another key.
    impostor = SigningKey(KEY.key_id, OTHER.secret)
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, impostor.sign(MESSAGE_TYPE, BODY))


_VALID = KEY.sign(MESSAGE_TYPE, BODY)
_DIGEST = _VALID.rpartition(".")[2]


@pytest.mark.parametrize(
    "signature",
    [
        "",
        ".",
        KEY.key_id,
        KEY.key_id + ".",
        _DIGEST,
        "." + _DIGEST,
        KEY.key_id + _DIGEST,
        KEY.key_id + ".." + _DIGEST,
        " " + _VALID,
        _VALID + " ",
        _VALID + "\n",
        _VALID[:-1],
        _VALID + "0",
        KEY.key_id + "." + _DIGEST[:32],
        KEY.key_id + "." + "0" * 64,
        f"{KEY.key_id}.{_DIGEST}.{_DIGEST}",
    ],
    ids=[
        "empty",
        "dot",
        "key-id-only",
        "key-id-and-dot",
        "digest-only",
        "dot-digest",
        "no-dot",
        "two-dots",
        "leading-space",
        "trailing-space",
        "trailing-newline",
        "digest-one-short",
        "digest-one-long",
        "half-digest",
        "zero-digest",
        "digest-twice",
    ],
)
def test_a_malformed_signature_string_does_not_verify(signature: str) -> None:
    assert signature != _VALID
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, signature)


@pytest.mark.parametrize(
    "signature",
    [
        _VALID.encode(),
        bytearray(_VALID.encode()),
        None,
        0,
        12345,
        1.5,
        True,
        [KEY.key_id, _DIGEST],
        {"key_id": KEY.key_id, "digest": _DIGEST},
    ],
    ids=["bytes", "bytearray", "none", "zero", "int", "float", "bool", "list", "dict"],
)
def test_a_signature_that_is_not_a_string_does_not_verify(signature: object) -> None:
    # Header values come off the wire as any AMQP field type; even the right bytes are refused.
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, signature)


def test_a_non_ascii_digest_under_a_known_key_id_does_not_verify() -> None:
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, f"{KEY.key_id}.\u00e9{_DIGEST[1:]}")


def test_a_non_ascii_key_id_does_not_verify() -> None:
    assert not is_signed(KEYS, MESSAGE_TYPE, BODY, f"msk_\u00e9\u00e9.{_DIGEST}")


# Keys


def test_the_repr_of_a_key_never_shows_its_secret() -> None:
    key = new_key()
    shown = [repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key}), str((key,))]
    forms = [key.secret.hex(), repr(key.secret), str(key.secret)[2:-1], key.secret.hex().upper()]
    for text in shown:
        assert key.key_id in text
        for form in forms:
            assert form not in text, text


def test_new_keys_are_random_and_long_enough() -> None:
    keys = [new_key() for _ in range(20)]
    assert len({key.key_id for key in keys}) == 20
    assert len({key.secret for key in keys}) == 20
    for key in keys:
        assert key.key_id.startswith("msk_")
        assert "." not in key.key_id  # it is followed by a dot in the header
        assert len(key.secret) >= 32


# The keys table (a database of each test's own)


@pytest.fixture
def fresh_database(postgres_server_url: str) -> Iterator[str]:
    """The URL of a database of this test's own; it does not exist until created or migrated."""
    # A synchronous fixture: its teardown drops the database with asyncio.run, outside the
    # test's event loop.
    with scratch_database(postgres_server_url) as url:
        yield url


@pytest.fixture
async def migrated(fresh_database: str) -> str:
    """A freshly migrated database of this test's own."""
    await migrate(fresh_database)
    return fresh_database


@pytest.fixture
async def conn(migrated: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def pool(migrated: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(migrated, min_size=0, max_size=2)
    try:
        yield created
    finally:
        await created.close()


async def stored_keys(conn: asyncpg.Connection) -> list[tuple[str, bytes]]:
    rows = await conn.fetch("SELECT key_id, secret FROM message_signing_keys ORDER BY key_id")
    return [(row["key_id"], bytes(row["secret"])) for row in rows]


async def test_migrate_creates_exactly_one_key_and_migrating_again_adds_none(
    fresh_database: str,
) -> None:
    await migrate(fresh_database)
    conn = await asyncpg.connect(fresh_database)
    try:
        first = await stored_keys(conn)
        assert len(first) == 1
        key_id, secret = first[0]
        assert key_id.startswith("msk_")
        assert len(secret) >= 32

        assert await migrate(fresh_database) == []
        assert await migrate(fresh_database) == []
        assert await stored_keys(conn) == first
    finally:
        await conn.close()


async def test_migrate_creates_no_key_where_keys_exist_and_one_where_none_are_left(
    conn: asyncpg.Connection, migrated: str
) -> None:
    rotated = await rotate(conn)
    before = await stored_keys(conn)
    await migrate(migrated)
    assert await stored_keys(conn) == before

    await conn.execute("DELETE FROM message_signing_keys")
    await migrate(migrated)
    after = await stored_keys(conn)
    assert len(after) == 1
    assert after[0][0] != rotated.key_id


async def test_the_table_refuses_a_short_secret(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO message_signing_keys (key_id, secret) VALUES ('short', $1)", bytes(31)
        )


async def test_rotate_keeps_the_two_newest_keys_newest_first(conn: asyncpg.Connection) -> None:
    (original,) = await newest_keys(conn)
    assert KEYS_KEPT == 2

    second = await rotate(conn)
    assert await newest_keys(conn) == [second, original]  # ids and secrets both

    third = await rotate(conn)
    assert await newest_keys(conn) == [third, second]
    assert await conn.fetchval("SELECT count(*) FROM message_signing_keys") == 2
    assert [key_id for key_id, _ in await list_keys(conn)] == [third.key_id, second.key_id]

    fourth = await rotate(conn)
    assert await newest_keys(conn) == [fourth, third]
    assert sorted(await stored_keys(conn)) == sorted(
        [(fourth.key_id, fourth.secret), (third.key_id, third.secret)]
    )
    assert len({original.key_id, second.key_id, third.key_id, fourth.key_id}) == 4


async def test_list_keys_gives_ids_and_times_newest_first_never_secrets(
    conn: asyncpg.Connection,
) -> None:
    await rotate(conn)
    listed = await list_keys(conn)
    assert len(listed) == 2
    (newer_id, newer_at), (older_id, older_at) = listed
    assert newer_at >= older_at
    assert newer_at.tzinfo is not None
    assert [newer_id, older_id] == [key.key_id for key in await newest_keys(conn)]
    secrets_ = {secret for _, secret in await stored_keys(conn)}
    assert not any(isinstance(part, bytes) for row in listed for part in row)
    assert all(secret not in repr(listed).encode() for secret in secrets_)


async def test_a_key_ring_reads_the_keys_and_follows_a_rotation(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    ring = KeyRing(pool)
    assert ring.keys == {}
    assert ring.newest is None

    assert await ring.try_refresh() is True
    (first,) = await newest_keys(conn)
    assert ring.newest == first
    assert ring.keys == {first.key_id: first}

    second = await rotate(conn)
    assert ring.newest == first, "nothing changes before the next refresh"
    assert await ring.try_refresh() is True
    assert ring.newest == second
    assert ring.keys == {second.key_id: second, first.key_id: first}

    third = await rotate(conn)
    assert await ring.try_refresh() is True
    assert ring.newest == third
    assert ring.keys == {third.key_id: third, second.key_id: second}


async def test_a_key_ring_on_an_empty_table_refreshes_with_no_key(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await conn.execute("DELETE FROM message_signing_keys")
    ring = KeyRing(pool)
    assert await ring.try_refresh() is True
    assert ring.keys == {}
    assert ring.newest is None


async def test_a_key_ring_on_an_unmigrated_database_fails_to_refresh(fresh_database: str) -> None:
    await create_database_if_missing(fresh_database)
    pool = await asyncpg.create_pool(fresh_database, min_size=0, max_size=1)
    try:
        ring = KeyRing(pool)
        assert await ring.try_refresh() is False
        assert ring.keys == {}
        assert ring.newest is None
        with pytest.raises(asyncpg.UndefinedTableError):
            await ring.refresh()
    finally:
        await pool.close()


async def test_a_key_ring_keeps_its_keys_when_the_table_disappears(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    ring = KeyRing(pool)
    assert await ring.try_refresh() is True
    known, newest = dict(ring.keys), ring.newest
    assert newest is not None

    await conn.execute("DROP TABLE message_signing_keys")
    assert await ring.try_refresh() is False
    assert ring.keys == known
    assert ring.newest == newest


async def test_a_key_ring_keeps_its_keys_while_the_database_is_unreachable(migrated: str) -> None:
    async with TcpProxy.for_url(migrated) as proxy:
        pool = await asyncpg.create_pool(
            proxy.url_through(migrated), min_size=0, max_size=1, timeout=5
        )
        try:
            ring = KeyRing(pool)
            assert await ring.try_refresh() is True
            known, newest = dict(ring.keys), ring.newest
            assert newest is not None

            await proxy.cut()  # the pooled connection dies; new ones are refused
            for _ in range(2):
                assert await ring.try_refresh() is False
                assert ring.keys == known
                assert ring.newest == newest

            await proxy.restore()
            assert await ring.try_refresh() is True
            assert ring.newest == newest
        finally:
            pool.terminate()


async def test_a_key_ring_that_never_reached_the_database_has_no_keys() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    pool = await asyncpg.create_pool(url, min_size=0, max_size=1, timeout=5)
    try:
        ring = KeyRing(pool)
        assert await ring.try_refresh() is False
        assert ring.keys == {}
        assert ring.newest is None
    finally:
        await pool.close()


async def test_a_key_ring_gives_up_on_a_database_that_never_answers() -> None:
    """An api or worker starting while PostgreSQL accepts connections but never answers
    waits READ_SECONDS for its keys, not the driver's connect timeout of a minute."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/silent", min_size=0, max_size=1
    )
    loop = asyncio.get_running_loop()
    try:
        ring = KeyRing(pool)
        started = loop.time()
        assert await ring.try_refresh() is False
        assert loop.time() - started < READ_SECONDS + 5  # not the driver's 60 s
        assert accepted, "the ring did try the database"
        assert ring.keys == {}
        assert ring.newest is None
    finally:
        pool.terminate()
        for writer in accepted:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
