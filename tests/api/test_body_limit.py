"""The request body limit: 413 past it, declared or streamed; the limit itself still passes."""

import json
from collections.abc import AsyncIterator

import httpx
from aio_pika.abc import AbstractQueue

from shared.settings import MIB, Settings
from tests.conftest import ENTITY, PROJECT, score_body, serving

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
CHUNK = 64 * 1024


def _valid_body_of(size: int) -> bytes:
    """A valid score body, padded inside `value` to exactly size bytes."""
    body = score_body(value={"pad": ""})
    unpadded = len(json.dumps(body).encode())
    body["value"] = {"pad": "x" * (size - unpadded)}
    encoded = json.dumps(body).encode()
    assert len(encoded) == size
    return encoded


async def _streamed(content: bytes) -> AsyncIterator[bytes]:
    """content in chunks, so that httpx sends it chunked, without a Content-Length."""
    for start in range(0, len(content), CHUNK):
        yield content[start : start + CHUNK]


def _assert_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert str(limit) in detail


async def _assert_nothing_published(queue: AbstractQueue) -> None:
    assert await queue.get(no_ack=True, fail=False) is None


def test_default_limit_is_one_mib(settings: Settings) -> None:
    assert settings.max_body_bytes == MIB


async def test_declared_body_over_the_limit_is_413(
    client: httpx.AsyncClient, headers: dict[str, str], persist_queue: AbstractQueue
) -> None:
    response = await client.post(URL, content=_valid_body_of(MIB + 1), headers=headers)

    assert response.request.headers["content-length"] == str(MIB + 1)
    _assert_too_large(response, MIB)
    await _assert_nothing_published(persist_queue)


async def test_streamed_body_over_the_limit_is_413(
    client: httpx.AsyncClient, headers: dict[str, str], persist_queue: AbstractQueue
) -> None:
    response = await client.post(URL, content=_streamed(_valid_body_of(MIB + 1)), headers=headers)

    assert "content-length" not in response.request.headers
    _assert_too_large(response, MIB)
    await _assert_nothing_published(persist_queue)


async def test_far_larger_streamed_body_is_413(
    client: httpx.AsyncClient, headers: dict[str, str], persist_queue: AbstractQueue
) -> None:
    response = await client.post(URL, content=_streamed(b"x" * (8 * MIB)), headers=headers)

    _assert_too_large(response, MIB)
    await _assert_nothing_published(persist_queue)


async def test_body_of_exactly_the_limit_is_accepted(
    client: httpx.AsyncClient, headers: dict[str, str], persist_queue: AbstractQueue
) -> None:
    response = await client.post(URL, content=_valid_body_of(MIB), headers=headers)

    assert response.status_code == 200, response.text
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert message.message_id == response.json()["score_id"]


async def test_streamed_body_of_exactly_the_limit_is_accepted(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(URL, content=_streamed(_valid_body_of(MIB)), headers=headers)

    assert "content-length" not in response.request.headers
    assert response.status_code == 200, response.text


async def test_invalid_body_at_the_limit_passes_the_size_check(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(URL, content=b" " * MIB, headers=headers)

    assert response.status_code == 422, response.text


async def test_configured_limit_applies(
    settings: Settings, headers: dict[str, str], persist_queue: AbstractQueue
) -> None:
    limit = 2048
    async with serving(settings.model_copy(update={"max_body_bytes": limit})) as client:
        over = await client.post(URL, content=_valid_body_of(limit + 1), headers=headers)
        _assert_too_large(over, limit)
        streamed = await client.post(URL, content=_streamed(b"x" * (limit + 1)), headers=headers)
        _assert_too_large(streamed, limit)
        await _assert_nothing_published(persist_queue)

        at = await client.post(URL, content=_valid_body_of(limit), headers=headers)
        assert at.status_code == 200, at.text
