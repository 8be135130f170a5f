"""Hostile and careless HTTP clients against a real `score-ingest api` process.

What a client can hold at the connection and request level is bounded (api/http_server.py):
headers and bodies that do not arrive in time, headers that do not end, connections that sit
idle. A write is refused before its body is read when its path, key or charset is wrong
(api/request_gate.py). Paths are neither redirected nor decoded into another project's name.
Raw sockets play the clients that no HTTP library would be.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractQueue

from api.keys import create_key
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body, serving
from tests.support.memory import rss_bytes
from tests.support.processes import ApiProcess, api_process

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
UNKNOWN_KEY = f"si_{'0' * 16}_{'A' * 43}"
BODY = json.dumps(score_body()).encode()
# How late a deadline may fire on a loaded test machine and still count as kept.
SLACK_SECONDS = 2.0


@dataclass(frozen=True)
class RawResponse:
    """A response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, decoded."""
        return json.loads(self.body)


class RawClient:
    """One TCP connection to the api, written and read byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, api: ApiProcess) -> Self:
        """A new connection to the api."""
        port = urlsplit(api.base_url).port
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        """Write data and wait until it is handed to the kernel."""
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> RawResponse:
        """The next response (an interim 100 Continue counts as one)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return RawResponse(int(status_line.split(" ")[1]), headers, body)

    async def closed_within(self, timeout: float) -> bytes:
        """Wait until the api closes the connection; what it sent meanwhile."""
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(self.reader.read(65536), timeout):
                received += chunk
        return received

    def close(self) -> None:
        """Close our side."""
        self.writer.close()


def _request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """A complete HTTP/1.1 request; Content-Length is set unless a Transfer-Encoding is."""
    fields = {"Host": "127.0.0.1", **(headers or {})}
    if "Transfer-Encoding" not in fields:
        fields["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@contextlib.asynccontextmanager
async def _ready_api(settings: Settings, **update: Any) -> AsyncIterator[ApiProcess]:
    """An api process on settings with update, yielded once /readyz says it can publish."""
    async with api_process(settings.model_copy(update=update)) as api:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        async with httpx.AsyncClient(base_url=api.base_url, timeout=2) as client:
            while (await client.get("/readyz")).status_code != 200:
                assert loop.time() < deadline, "the api did not get ready"
                await asyncio.sleep(0.05)
        yield api


async def _assert_nothing_published(queue: AbstractQueue) -> None:
    assert await queue.get(no_ack=True, fail=False) is None, "a score was published"


# --- Headers: a deadline and a size -------------------------------------------------------


async def test_headers_that_do_not_arrive_in_time_cost_the_client_its_connection(
    settings: Settings,
) -> None:
    async with _ready_api(settings, http_header_timeout_seconds=1.0) as api:
        idle, trickling, kept_alive, slow_but_in_time = [
            await RawClient.connect(api) for _ in range(4)
        ]
        opened = time.monotonic()

        async def trickle(client: RawClient, head: bytes) -> None:
            # A slowloris: a byte every 50 ms, for ever (until the api cuts it off).
            with contextlib.suppress(ConnectionError):
                for byte in head + b"X-Slow: " + b"a" * 1000:
                    await client.send(bytes([byte]))
                    await asyncio.sleep(0.05)

        await kept_alive.send(_request("GET", "/healthz"))
        assert (await kept_alive.response()).status == 200
        answered = time.monotonic()
        tasks = [
            asyncio.create_task(trickle(trickling, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")),
            asyncio.create_task(trickle(kept_alive, b"GET /healthz HTTP/1.1\r\n")),
        ]
        for piece in (b"GET /healthz HT", b"TP/1.1\r\nHost: x\r", b"\n\r\n"):
            await slow_but_in_time.send(piece)
            await asyncio.sleep(0.1)
        try:
            assert (await slow_but_in_time.response()).status == 200

            # Nothing sent: closed without a word.
            assert await idle.closed_within(1.0 + SLACK_SECONDS) == b""
            assert time.monotonic() - opened >= 0.9
            # Part of a request: 408, then closed, though bytes kept coming.
            for client, since in ((trickling, opened), (kept_alive, answered)):
                response = await client.response(1.0 + SLACK_SECONDS)
                assert response.status == 408, response
                assert response.headers["connection"] == "close"
                assert response.json() == {"detail": "request headers not received in time"}
                assert await client.closed_within(SLACK_SECONDS) == b""
                assert time.monotonic() - since < 1.0 + SLACK_SECONDS
        finally:
            for task in tasks:
                task.cancel()
            for client in (idle, trickling, kept_alive, slow_but_in_time):
                client.close()


async def test_headers_over_the_size_limit_are_431(settings: Settings) -> None:
    limit = settings.http_max_header_bytes
    async with _ready_api(settings) as api:
        cases = {
            "one long header": {"X-Pad": "a" * limit},
            "many short headers": {f"X-Pad-{i}": "a" * 40 for i in range(limit // 40)},
            "a long path": {},
        }
        for name, headers in cases.items():
            client = await RawClient.connect(api)
            path = "/healthz" if headers else "/healthz?" + "q" * limit
            await client.send(_request("GET", path, headers))
            response = await client.response()
            assert response.status == 431, name
            assert response.json() == {
                "detail": f"request headers are larger than the limit of {limit} bytes"
            }
            assert await client.closed_within(SLACK_SECONDS) == b""

        # Just under the limit is served.
        client = await RawClient.connect(api)
        await client.send(_request("GET", "/healthz", {"X-Pad": "a" * (limit - 200)}))
        assert (await client.response()).status == 200
        client.close()


async def test_unfinished_header_lines_do_not_grow_the_api(settings: Settings) -> None:
    """30 clients each send a 10 MB header line that never ends: each is cut off after the
    header limit, and the api's memory stays where it was."""
    async with _ready_api(settings) as api:
        before = rss_bytes(api.process.pid)
        peak = before
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_bytes(api.process.pid))
                await asyncio.sleep(0.01)

        async def flood() -> bool:
            """Send the line; True when the api closed the connection before it was sent."""
            client = await RawClient.connect(api)
            try:
                await client.send(b"POST " + URL.encode() + b" HTTP/1.1\r\nX-Pad: ")
                for _ in range(40):
                    await client.send(b"a" * (256 * 1024))
            except ConnectionError:
                return True
            finally:
                client.close()
            return False

        sampler = asyncio.create_task(sample())
        try:
            cut_off = await asyncio.wait_for(asyncio.gather(*(flood() for _ in range(30))), 30)
        finally:
            sampling = False
            await sampler
        assert all(cut_off), "the api read a whole 10 MB header line"
        assert peak < 200 * 1024 * 1024, f"api RSS reached {peak / 2**20:.0f} MiB"
        assert peak - before < 64 * 1024 * 1024, (
            f"api RSS grew by {(peak - before) / 2**20:.0f} MiB"
        )
        async with httpx.AsyncClient(base_url=api.base_url, timeout=1) as client:
            assert (await client.get("/healthz")).status_code == 200


# --- Bodies: a deadline --------------------------------------------------------------------


async def test_a_body_that_does_not_arrive_in_time_is_408(
    settings: Settings, api_key: str, persist_queue: AbstractQueue
) -> None:
    async with _ready_api(settings, http_body_timeout_seconds=1.0) as api:
        headers = {**basic_auth(api_key), "Content-Type": "application/json"}
        stalled = await RawClient.connect(api)
        trickling = await RawClient.connect(api)
        started = time.monotonic()
        await stalled.send(_request("POST", URL, headers, BODY)[:-10])

        async def trickle() -> None:
            # A chunk every 50 ms: always something arriving, never the end.
            with contextlib.suppress(ConnectionError):
                await trickling.send(
                    _request("POST", URL, {**headers, "Transfer-Encoding": "chunked"})
                )
                for _ in range(200):
                    await trickling.send(_chunk(b" "))
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(trickle())
        try:
            for client in (stalled, trickling):
                response = await client.response(1.0 + SLACK_SECONDS)
                assert response.status == 408, response
                assert response.json() == {"detail": "request body not received in time"}
                assert response.headers["connection"] == "close"
                assert await client.closed_within(SLACK_SECONDS) == b""
            assert time.monotonic() - started < 1.0 + SLACK_SECONDS
        finally:
            task.cancel()
            stalled.close()
            trickling.close()
        await _assert_nothing_published(persist_queue)
        # The deadline is for arriving, not for being answered: a whole body in time is fine.
        async with httpx.AsyncClient(base_url=api.base_url, timeout=5) as http:
            assert (await http.post(URL, content=BODY, headers=headers)).status_code == 200
            # Counted as requests whose client went away (499), not as server errors.
            metrics = (await http.get("/metrics")).text
        assert 'status="500"' not in metrics
        assert 'status="499"' in metrics


# --- Connections: a bound that idle ones cannot fill ---------------------------------------


async def test_300_idle_connections_do_not_keep_a_client_waiting(
    settings: Settings, api_key: str
) -> None:
    async with _ready_api(settings) as api:
        idle = [await RawClient.connect(api) for _ in range(300)]
        slow = idle[:100]
        for client in slow:
            await client.send(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        try:
            async with httpx.AsyncClient(base_url=api.base_url, timeout=1) as http:
                started = time.monotonic()
                response = await http.post(
                    URL,
                    content=BODY,
                    headers={**basic_auth(api_key), "Content-Type": "application/json"},
                )
                assert response.status_code == 200, response.text
                assert time.monotonic() - started < 1.0
        finally:
            for raw in idle:
                raw.close()


async def test_past_the_connection_bound_the_longest_idle_connection_makes_room(
    settings: Settings,
) -> None:
    async with _ready_api(settings, http_max_connections=20) as api:
        opened = [await RawClient.connect(api) for _ in range(50)]
        try:
            async with httpx.AsyncClient(base_url=api.base_url, timeout=1) as http:
                started = time.monotonic()
                assert (await http.get("/healthz")).status_code == 200
                assert time.monotonic() - started < 1.0
            # The oldest made room, in order; the newest still serve.
            closed = await asyncio.gather(*(c.closed_within(SLACK_SECONDS) for c in opened[:31]))
            assert closed == [b""] * 31
            for client in opened[31:]:
                await client.send(_request("GET", "/healthz"))
                assert (await client.response()).status == 200
        finally:
            for client in opened:
                client.close()


async def test_past_the_connection_bound_with_every_connection_busy_it_is_503(
    settings: Settings, api_key: str
) -> None:
    async with _ready_api(settings, http_max_connections=3) as api:
        headers = {
            **basic_auth(api_key),
            "Content-Type": "application/json",
            "Expect": "100-continue",
        }
        busy = [await RawClient.connect(api) for _ in range(3)]
        extra: list[RawClient] = []
        try:
            for client in busy:
                await client.send(_request("POST", URL, headers, BODY)[: -len(BODY)])
                # The api asks for the body: the request is in, its body awaited.
                assert (await client.response()).status == 100
            refused = await RawClient.connect(api)
            extra.append(refused)
            response = await refused.response()
            assert response.status == 503, response
            assert response.headers["retry-after"] == str(settings.retry_after_seconds)
            assert await refused.closed_within(SLACK_SECONDS) == b""

            # Once a request is answered, its connection is idle and makes room.
            await busy[0].send(BODY)
            assert (await busy[0].response()).status == 200
            served = await RawClient.connect(api)
            extra.append(served)
            await served.send(_request("GET", "/healthz"))
            assert (await served.response()).status == 200
            assert await busy[0].closed_within(SLACK_SECONDS) == b""
        finally:
            for client in busy + extra:
                client.close()


# --- A write is refused before its body is read ---------------------------------------------


class SlowBody:
    """A request's head, then its chunked body 64 KiB every 50 ms: up to a 16 MiB batch in
    13 s, unless the api answers first."""

    def __init__(self, client: RawClient, head: bytes) -> None:
        self.client = client
        self.head = head
        self.chunks_sent = 0

    async def send(self) -> None:
        """Send until the whole body is out or the api closed the connection."""
        with contextlib.suppress(ConnectionError):
            await self.client.send(self.head)
            for _ in range(256):
                await self.client.send(_chunk(b" " * 65536))
                self.chunks_sent += 1
                await asyncio.sleep(0.05)


@pytest.fixture
async def other_entity_key(db: asyncpg.Connection) -> str:
    _, key = await create_key(db, "someone-else", name="another entity")
    return key


@pytest.mark.parametrize("path", [URL, f"{URL}/batch"], ids=["single", "batch"])
async def test_a_write_without_a_valid_key_is_refused_before_its_body(
    settings: Settings,
    api_key: str,
    other_entity_key: str,
    persist_queue: AbstractQueue,
    path: str,
) -> None:
    refusals = {
        "no key": ({}, 401),
        "unknown key": (bearer_auth(UNKNOWN_KEY), 401),
        "key of another entity": (basic_auth(other_entity_key), 403),
    }
    async with _ready_api(settings) as api:
        for name, (auth, status) in refusals.items():
            client = await RawClient.connect(api)
            headers = {**auth, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
            slowly = SlowBody(client, _request("POST", path, headers))
            sender = asyncio.create_task(slowly.send())
            try:
                response = await client.response()
                assert response.status == status, (name, response)
                assert not sender.done(), f"{name}: answered only after the whole body"
                assert slowly.chunks_sent < 40, f"{name}: {slowly.chunks_sent} chunks before"
                assert response.headers["connection"] == "close"
                await client.closed_within(SLACK_SECONDS)
            finally:
                sender.cancel()
                client.close()

            # Asked to confirm first (Expect: 100-continue), the api never asks for the body.
            client = await RawClient.connect(api)
            await client.send(_request("POST", path, {**headers, "Expect": "100-continue"}))
            response = await client.response()
            assert response.status == status, (name, response)
            client.close()

        # A valid key's body is read, however slowly it comes.
        client = await RawClient.connect(api)
        body = json.dumps({"scores": [score_body()]}).encode() if path.endswith("batch") else BODY
        headers = {**basic_auth(api_key), "Content-Type": "application/json"}
        await client.send(_request("POST", path, {**headers, "Transfer-Encoding": "chunked"}))
        for start in range(0, len(body), 20):
            await client.send(_chunk(body[start : start + 20]))
            await asyncio.sleep(0.01)
        await client.send(b"0\r\n\r\n")
        assert (await client.response()).status == 200
        client.close()
        message = await persist_queue.get(no_ack=True, fail=False)
        assert message is not None
        await _assert_nothing_published(persist_queue)


# --- Paths and charsets ---------------------------------------------------------------------


async def test_a_trailing_slash_is_not_found_not_redirected(
    settings: Settings, api_key: str
) -> None:
    headers = {
        **basic_auth(api_key),
        "Content-Type": "application/json",
        "Host": "attacker.example",
    }
    async with (
        _ready_api(settings) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=5) as client,
    ):
        for method, path in (
            ("POST", f"{URL}/"),
            ("POST", f"{URL}/batch/"),
            ("GET", f"{URL}/"),
        ):
            response = await client.request(method, path, content=BODY, headers=headers)
            assert response.status_code == 404, (method, path, response.text)
            assert "location" not in response.headers


NOT_UTF8 = {
    "loc": ["path", "project"],
    "msg": "Input should be a valid string, unable to parse raw data as a unicode string",
    "type": "string_unicode",
}


async def test_a_name_whose_escapes_are_not_utf8_is_refused(
    settings: Settings, api_key: str, persist_queue: AbstractQueue
) -> None:
    headers = {**basic_auth(api_key), "Content-Type": "application/json"}
    batch = json.dumps({"scores": [score_body()]}).encode()
    async with (
        _ready_api(settings) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=5) as client,
    ):
        # %ff and %fe would both be read as U+FFFD: two paths, one project.
        for project in ("%ff", "%fe", "%ff%fe", "ev%c3als", "%ed%a0%80"):
            for method, path, body in (
                ("POST", f"/v2/{ENTITY}/{project}/scores", BODY),
                ("POST", f"/v2/{ENTITY}/{project}/scores/batch", batch),
                ("GET", f"/v2/{ENTITY}/{project}/scores", b""),
                ("DELETE", f"/v2/{ENTITY}/{project}/scores?score_ids={'0' * 32}", b""),
            ):
                response = await client.request(method, path, content=body, headers=headers)
                assert response.status_code == 422, (method, path, response.text)
                assert response.json() == {"detail": [NOT_UTF8]}
        both = await client.post("/v2/%c3/%ff/scores", content=BODY, headers=headers)
        assert both.json() == {"detail": [{**NOT_UTF8, "loc": ["path", "entity"]}, NOT_UTF8]}
        # Escaped UTF-8 is a name like any other.
        escaped = await client.post(
            f"/v2/{ENTITY}/%C3%A9vals/scores", content=BODY, headers=headers
        )
        assert escaped.status_code == 200, escaped.text
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert json.loads(message.body)["project"] == "évals"
    await _assert_nothing_published(persist_queue)


async def test_a_body_in_another_charset_than_utf8_is_415(
    settings: Settings, api_key: str, persist_queue: AbstractQueue
) -> None:
    auth = basic_auth(api_key)
    single = json.dumps(score_body(prediction_id="café"), ensure_ascii=False)
    batch = json.dumps({"scores": [score_body(prediction_id="café")]}, ensure_ascii=False)
    async with serving(settings) as client:
        for charset, encoding in (
            ("latin-1", "latin-1"),
            ("ISO-8859-1", "latin-1"),
            ("utf-16", "utf-16"),
        ):
            for path, text in ((URL, single), (f"{URL}/batch", batch)):
                response = await client.post(
                    path,
                    content=text.encode(encoding),
                    headers={**auth, "Content-Type": f"application/json; charset={charset}"},
                )
                assert response.status_code == 415, (charset, path, response.text)
                assert response.json() == {
                    "detail": f"charset {charset.lower()!r} is not supported: send UTF-8"
                }
        await _assert_nothing_published(persist_queue)
        accepted = []
        for content_type in (
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=UTF8",
            'application/json; charset="Utf-8"',
            "application/json; charset=us-ascii",
        ):
            for path, text in ((URL, single), (f"{URL}/batch", batch)):
                if "ascii" in content_type:
                    text = text.replace("é", "\\u00e9")
                response = await client.post(
                    path, content=text.encode(), headers={**auth, "Content-Type": content_type}
                )
                assert response.status_code == 200, (content_type, path, response.text)
                accepted.append(response)
    prediction_ids = []
    while (message := await persist_queue.get(no_ack=True, fail=False)) is not None:
        body = json.loads(message.body)
        prediction_ids += [score["prediction_id"] for score in body.get("scores", [body])]
    assert prediction_ids == ["café"] * len(accepted)


async def test_the_gate_refuses_keys_and_names_in_the_routes_words(
    settings: Settings, api_key: str, other_entity_key: str
) -> None:
    """A write is refused by the gate, a read by FastAPI's dependencies: the same answer."""
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "no key": (URL, {}),
        "empty authorization": (URL, {"Authorization": ""}),
        "basic without colon": (URL, {"Authorization": "Basic YWJj"}),
        "basic not base64": (URL, {"Authorization": "Basic !!!"}),
        "basic, no credentials": (URL, {"Authorization": "Basic"}),
        "empty bearer": (URL, {"Authorization": "Bearer "}),
        "unknown scheme": (URL, {"Authorization": "Token abc"}),
        "malformed key": (URL, bearer_auth("nope")),
        "unknown key": (URL, bearer_auth(UNKNOWN_KEY)),
        "another entity": (URL, basic_auth(other_entity_key)),
        "invalid names": ("/v2/ac:me/ev%01als/scores", basic_auth(api_key)),
        "invalid names, no key": (f"/v2/{'e' * 129}/ev:als/scores", {}),
    }
    async with serving(settings) as client:
        for name, (path, headers) in cases.items():
            written = await client.post(
                path, content=BODY, headers={**headers, "Content-Type": "application/json"}
            )
            read = await client.get(path, headers=headers)
            assert written.status_code in (401, 403, 422), (name, written.text)
            assert (written.status_code, written.json()) == (read.status_code, read.json()), name
            assert written.headers.get("www-authenticate") == read.headers.get("www-authenticate")
