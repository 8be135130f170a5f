"""The one create path: every request to the writes is answered as it was before it.

Until issue 14 a plain single-score POST was answered by a fast path in front of FastAPI,
and everything else by FastAPI's routes; they gave the same answer to every case below, and
those answers are kept in create_path_answers.json: status, headers but x-request-id, body
with a 200's score id masked. Each case now goes to one app, running its lifespan against the
real PostgreSQL and RabbitMQ, at the root and behind a path prefix, and must get its recorded
answer, publish what it answered and no more, and have its body read only when its path, key
and charset passed (RequestGate answers the rest before reading a byte of it).
"""

import asyncio
import base64
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from fastapi import APIRouter, Depends, Query
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.app import create_app
from api.deps import ProjectScopeDep
from api.json_route import WriteRoute
from api.keys import create_key, revoke_key
from api.metrics import RequestContextMiddleware
from api.request_gate import RequestGate
from api.routes import scores
from api.schemas import ScoreCreateBody, ScoreCreateRes
from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE, ScoreBatchMessage, ScoreMessage
from shared.settings import Settings
from shared.topology import API_EXCHANGE, ROUTING_KEY
from tests.api.test_health_and_metrics import SCORES_ROUTE, Samples, sample, scrape
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body
from tests.support.processes import api_process
from tests.support.services import free_port

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
JSON_TYPE = {"Content-Type": "application/json"}
UNKNOWN_KEY = f"si_{'0' * 16}_{'A' * 43}"
UUID_TEXT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PREFIX = "/ingest"
ROOT_PATHS = pytest.mark.parametrize("root_path", ["", PREFIX], ids=["at /", f"behind {PREFIX}"])
ANSWERS: dict[str, dict[str, Any]] = json.loads(
    Path(__file__).with_name("create_path_answers.json").read_text()
)


def _json(body: object) -> bytes:
    """body as a client writes it (json.dumps writes NaN and lone surrogates too)."""
    return json.dumps(body).encode()


def _without(name: str) -> dict[str, object]:
    body = score_body()
    del body[name]
    return body


VALID = _json(score_body())


# --- The app, watched ------------------------------------------------------------------------


class BodyWatch:
    """Wraps the app and notes whether a request's body was read before it was answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.read_before_answer = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, watching its receive and send."""
        answered = False

        async def watched_receive() -> Message:
            if not answered:
                self.read_before_answer = True
            return await receive()

        async def watched_send(message: Message) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, watched_receive, watched_send)


@dataclass(frozen=True)
class Served:
    """A client of a running app, behind root_path, and the app's watch."""

    client: httpx.AsyncClient
    watch: BodyWatch
    root_path: str

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to path under the app's root path."""
        return await self.client.request(method, self.root_path + path, **kwargs)


@contextlib.asynccontextmanager
async def _serving(
    settings: Settings, root_path: str = "", *, broker_up: bool = True
) -> AsyncIterator[Served]:
    """The app on settings, its lifespan running (as in tests.conftest.running_app, which
    also waits for the broker: here only when it is up), served behind root_path as uvicorn
    serves it (the path with the prefix, root_path the prefix)."""
    application = create_app(settings)
    watch = BodyWatch(application)
    transport = httpx.ASGITransport(app=watch, root_path=root_path)
    async with application.router.lifespan_context(application):
        if broker_up:
            publisher = application.state.services.publisher
            await asyncio.wait_for(publisher.wait_ready(), timeout=10)
        async with httpx.AsyncClient(transport=transport, base_url="http://score-ingest") as client:
            yield Served(client, watch, root_path)


class Outage(Enum):
    """A service the app is pointed away from: nothing listens on the port it gets."""

    BROKER = "broker"
    DATABASE = "database"


def _with_outage(settings: Settings, outage: Outage | None) -> Settings:
    if outage is Outage.BROKER:
        return settings.model_copy(
            update={
                "amqp_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                "publish_timeout_seconds": 0.5,
            }
        )
    if outage is Outage.DATABASE:
        return settings.model_copy(
            update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/score_ingest"}
        )
    return settings


# --- Answers and what was published ----------------------------------------------------------


def _answer(response: httpx.Response) -> dict[str, Any]:
    """What is recorded of an answer: the status, the headers but x-request-id (sorted: a
    repeated header counts), and the body with any score id masked in a 200."""
    headers = sorted(
        [name, value] for name, value in response.headers.multi_items() if name != "x-request-id"
    )
    body = response.content
    if response.status_code == 200:
        body = UUID_TEXT.sub(b"<uuid>", body)
    return {"status": response.status_code, "headers": headers, "body": body.decode()}


def _only_score_id(response: httpx.Response) -> str:
    """The score_id of a 200 whose body is exactly {"score_id": <a UUIDv7>}."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["score_id"], body
    score_id = body["score_id"]
    assert isinstance(score_id, str)
    parsed = uuid.UUID(score_id)
    assert str(parsed) == score_id
    assert parsed.version == 7
    return score_id


def _scores_in(message: AbstractIncomingMessage) -> list[ScoreMessage]:
    if message.type == BATCH_MESSAGE_TYPE:
        return list(ScoreBatchMessage.model_validate_json(message.body).scores)
    assert message.type == MESSAGE_TYPE, message.type
    return [ScoreMessage.model_validate_json(message.body)]


async def _published_scores(queue: AbstractQueue) -> list[ScoreMessage]:
    """Every score waiting on scores.persist (no worker runs), taken off it."""
    scores: list[ScoreMessage] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        scores += _scores_in(message)
    return scores


async def _take_only_message(queue: AbstractQueue) -> AbstractIncomingMessage:
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None, "nothing was published"
    assert await queue.get(no_ack=True, fail=False) is None, "more than one message"
    return message


# --- Keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """A key of every kind the cases use, stored in the session's database."""

    valid: str
    revoked: str
    other_entity: str
    other_project: str


@pytest.fixture
async def keys(db: asyncpg.Connection, api_key: str) -> Keys:
    revoked_info, revoked = await create_key(db, ENTITY, name="revoked")
    assert await revoke_key(db, revoked_info.key_id)
    _, other_entity = await create_key(db, "someone-else", name="another entity")
    _, other_project = await create_key(db, ENTITY, [f"not-{PROJECT}"], name="another project")
    return Keys(api_key, revoked, other_entity, other_project)


Headers = Callable[[Keys], dict[str, str]]


def _basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _authorization(value: Callable[[Keys], str]) -> Headers:
    """This Authorization header, with a JSON content type."""
    return lambda keys: {"Authorization": value(keys), **JSON_TYPE}


def _valid_key(content_type: str | None = "application/json", **extra: str) -> Headers:
    """The valid key in HTTP Basic (user `api`), this content type (None: none) and extra."""

    def headers(keys: Keys) -> dict[str, str]:
        typed = {} if content_type is None else {"Content-Type": content_type}
        return {**basic_auth(keys.valid), **typed, **extra}

    return headers


VALID_KEY = _valid_key()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- The cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request, the status of its recorded answer, whether its body is read before it is
    answered (None: not a POST, not watched), and how many scores it publishes."""

    status: int
    reads_body: bool | None = None
    headers: Headers = VALID_KEY
    body: bytes = VALID
    method: str = "POST"
    path: str = URL
    outage: Outage | None = None
    published: int = 0

    @property
    def creates_one(self) -> bool:
        """Whether this is a POST to the create path."""
        return self.method == "POST" and urlsplit(self.path).path == URL


def created(headers: Headers = VALID_KEY, body: bytes = VALID, path: str = URL) -> Case:
    """A score created: 200, one score published."""
    return Case(200, True, headers, body, path=path, published=1)


def invalid(status: int, body: bytes = VALID, headers: Headers = VALID_KEY) -> Case:
    """A POST to the create path whose body is read and refused with status."""
    return Case(status, True, headers, body)


def unread(
    status: int, headers: Headers, outage: Outage | None = None, body: bytes = VALID
) -> Case:
    """A POST to the create path answered with status before its body is read: its key,
    charset or declared length."""
    return Case(status, False, headers, body, outage=outage)


def _with_key(key: Callable[[Keys], str], auth: Callable[[str], dict[str, str]]) -> Headers:
    return lambda keys: {**auth(key(keys)), **JSON_TYPE}


CASES: dict[str, Case] = {
    # Valid requests.
    "basic, username api": created(VALID_KEY),
    "basic, another username": created(
        _with_key(lambda k: k.valid, lambda key: _basic("user@example.com", key))
    ),
    "basic, empty username": created(_with_key(lambda k: k.valid, lambda key: _basic("", key))),
    "lower-case basic": created(_authorization(lambda k: f"basic {_b64('api:' + k.valid)}")),
    "bearer": created(_with_key(lambda k: k.valid, bearer_auth)),
    "lower-case bearer": created(_authorization(lambda k: f"bearer {k.valid}")),
    "application/json": created(_valid_key("application/json")),
    "json with charset": created(_valid_key("application/json; charset=utf-8")),
    "upper-case json": created(_valid_key("APPLICATION/JSON")),
    "no evaluation_run_id": created(body=_json(_without("evaluation_run_id"))),
    "null value, unicode": created(body=_json(score_body(value=None, prediction_id="préd-😀"))),
    "unknown field": created(body=_json(score_body(extra="ignored"))),
    "query string": created(path=f"{URL}?evaluation_run_id=x"),
    "bearer after two spaces": created(_authorization(lambda k: f"Bearer  {k.valid}")),
    # Basic credentials are read with a lenient base64 decoder (as FastAPI's HTTPBasic reads
    # them), which skips such characters.
    "basic with characters outside base64": created(
        _authorization(lambda k: f"Basic !{_b64('api:' + k.valid)}!")
    ),
    # Keys that fail: in the header (as FastAPI's HTTPBasic/HTTPBearer refuse it), or the key.
    "no authorization": unread(401, lambda k: dict(JSON_TYPE)),
    "basic not base64": unread(401, _authorization(lambda k: "Basic !!!not-base64!!!")),
    "basic without colon": unread(401, _authorization(lambda k: f"Basic {_b64(k.valid)}")),
    "basic not ascii": unread(
        401, _authorization(lambda k: f"Basic {_b64('api:' + k.valid + 'é')}")
    ),
    "empty bearer": unread(401, _authorization(lambda k: "Bearer ")),
    "unknown scheme": unread(401, _authorization(lambda k: "Token x")),
    "basic, empty password": unread(401, _with_key(lambda k: "", basic_auth)),
    "unknown key": unread(401, _with_key(lambda k: UNKNOWN_KEY, bearer_auth)),
    "malformed key": unread(401, _with_key(lambda k: "not-an-api-key", basic_auth)),
    "revoked key": unread(401, _with_key(lambda k: k.revoked, basic_auth)),
    "key of another entity": unread(403, _with_key(lambda k: k.other_entity, bearer_auth)),
    "key of another project": unread(403, _with_key(lambda k: k.other_project, basic_auth)),
    # Bodies and content types that do not validate, with FastAPI's errors.
    "missing prediction_id": invalid(422, _json(_without("prediction_id"))),
    "prediction_id a number": invalid(422, _json(score_body(prediction_id=42))),
    "empty evaluation_run_id": invalid(422, _json(score_body(evaluation_run_id=""))),
    "bad scorer ref": invalid(422, _json(score_body(scorer="weave:///not/a/ref"))),
    "NUL in value": invalid(422, _json(score_body(value={"a": "x\u0000y"}))),
    "NUL in prediction_id": invalid(422, _json(score_body(prediction_id="p\u0000"))),
    "invalid json": invalid(422, VALID[:-1]),
    "empty body": invalid(422, b""),
    "json array": invalid(422, _json([score_body()])),
    "json string": invalid(422, _json("score")),
    "NaN literal": invalid(422, _json(score_body(value=float("nan")))),
    "number overflowing to infinity": invalid(422, VALID.replace(b"0.75", b"1e400")),
    # FastAPI (strict_content_type, its default) does not read a body without a JSON
    # content type as JSON.
    "no content type": invalid(422, headers=_valid_key(None)),
    "empty content type": invalid(422, headers=_valid_key("")),
    "text/plain": invalid(422, headers=_valid_key("text/plain")),
    "form urlencoded": invalid(422, headers=_valid_key("application/x-www-form-urlencoded")),
    # Names are checked before the key, as FastAPI's routes check them, but before the body
    # is read.
    "entity with a colon": Case(422, False, path=f"/v2/ac:me/{PROJECT}/scores"),
    "entity with a percent": Case(422, False, path=f"/v2/ac%25me/{PROJECT}/scores"),
    "entity of 129 characters": Case(422, False, path=f"/v2/{'e' * 129}/{PROJECT}/scores"),
    "project with a control character": Case(422, False, path=f"/v2/{ENTITY}/ev%01als/scores"),
    "both names invalid, no key": Case(
        422, False, lambda k: dict(JSON_TYPE), path="/v2/ac:me/ev%01als/scores"
    ),
    # Percent-escapes that are not UTF-8 would be read as U+FFFD: another path's project.
    "project not UTF-8": Case(422, False, path=f"/v2/{ENTITY}/%ff%fe/scores"),
    "entity not UTF-8": Case(422, False, path=f"/v2/ac%c3me/{PROJECT}/scores"),
    "project not UTF-8, batch": Case(
        422, False, body=_json({"scores": [score_body()]}), path=f"/v2/{ENTITY}/%ff/scores/batch"
    ),
    "project not UTF-8, GET": Case(422, body=b"", method="GET", path=f"/v2/{ENTITY}/%ff/scores"),
    "percent-encoded UTF-8 project": created(path=f"/v2/{ENTITY}/%C3%A9vals/scores"),
    # The key is checked before the body is read: a body is never decoded for a bad key.
    "invalid body, unknown key": unread(
        401, _with_key(lambda k: UNKNOWN_KEY, bearer_auth), body=_json(score_body(scorer="nope"))
    ),
    "invalid body, key of another entity": unread(
        403, _with_key(lambda k: k.other_entity, basic_auth), body=b"[]"
    ),
    "invalid json, no key": unread(401, lambda k: dict(JSON_TYPE), body=b"{"),
    "body over the limit, no key": unread(
        401, lambda k: dict(JSON_TYPE), body=_json(score_body(value="x" * 1024 * 1024))
    ),
    # Bodies are read as UTF-8 only: another charset is refused, after the key.
    "charset latin-1": unread(415, _valid_key("application/json; charset=latin-1")),
    "charset utf-16": unread(415, _valid_key("application/json; charset=utf-16")),
    "quoted charset iso-8859-1": unread(415, _valid_key('application/json; charset="ISO-8859-1"')),
    "text/plain, charset latin-1": unread(415, _valid_key("text/plain; charset=latin-1")),
    "charset latin-1, unknown key": unread(
        401,
        lambda k: {**bearer_auth(UNKNOWN_KEY), "Content-Type": "application/json; charset=latin-1"},
    ),
    "charset latin-1, batch": Case(
        415,
        False,
        _valid_key("application/json; charset=latin-1"),
        _json({"scores": [score_body()]}),
        path=f"{URL}/batch",
    ),
    "charset UTF8": created(_valid_key("application/json; charset=UTF8")),
    "quoted charset utf-8": created(_valid_key('application/json; charset="utf-8"')),
    "charset us-ascii": created(_valid_key("application/json; charset=US-ASCII")),
    "+json content type": created(_valid_key("application/vnd.api+json")),
    "idempotency key": created(_valid_key(**{"Idempotency-Key": "retry-1"})),
    "invalid idempotency key": invalid(422, headers=_valid_key(**{"Idempotency-Key": "a b"})),
    "body over the limit": unread(413, VALID_KEY, body=_json(score_body(value="x" * 1024 * 1024))),
    # Near the create path, but not it.
    # No redirect (its Location would be built from the Host header): not found.
    "trailing slash": Case(404, False, path=f"{URL}/"),
    "trailing slash, batch": Case(404, False, path=f"{URL}/batch/"),
    "batch": Case(
        200,
        True,
        body=_json({"scores": [score_body(), score_body(prediction_id="p-2")]}),
        path=f"{URL}/batch",
        published=2,
    ),
    "GET the create path": Case(200, None, body=b"", method="GET"),
    "GET the create path without a key": Case(401, None, lambda k: {}, b"", method="GET"),
    "PUT the create path": Case(405, None, method="PUT"),
    "HEAD the create path": Case(405, None, method="HEAD", body=b""),
    "extra segment inside": Case(404, False, path=f"/v2/{ENTITY}/{PROJECT}/x/scores"),
    "extra segment after": Case(405, False, path=f"{URL}/x"),
    "encoded slash in the entity": Case(404, False, path=f"/v2/a%2Fb/{PROJECT}/scores"),
    "empty entity": Case(404, False, path=f"/v2//{PROJECT}/scores"),
    "v1": Case(404, False, path=f"/v1/{ENTITY}/{PROJECT}/scores"),
    # Services down: a 503 with Retry-After, or the answer that comes first.
    "broker down": Case(503, True, outage=Outage.BROKER),
    "broker down, bearer": Case(
        503, True, _with_key(lambda k: k.valid, bearer_auth), outage=Outage.BROKER
    ),
    "broker down, batch": Case(
        503, True, body=_json({"scores": [score_body()]}), path=f"{URL}/batch", outage=Outage.BROKER
    ),
    "broker down, invalid body": replace(invalid(422, b"[]"), outage=Outage.BROKER),
    "database down, uncached key": unread(503, VALID_KEY, Outage.DATABASE),
    "database down, malformed key": unread(
        401, _with_key(lambda k: "not-an-api-key", basic_auth), Outage.DATABASE
    ),
    "database down, invalid body": unread(503, VALID_KEY, Outage.DATABASE, body=b"[]"),
}


def test_every_case_has_a_recorded_answer() -> None:
    assert set(ANSWERS["requests"]) == set(CASES)
    assert set(ANSWERS["streamed"]) == set(STREAMED)


@ROOT_PATHS
@pytest.mark.parametrize("name", CASES)
async def test_each_request_gets_its_recorded_answer(
    settings: Settings, keys: Keys, persist_queue: AbstractQueue, name: str, root_path: str
) -> None:
    case = CASES[name]
    settings = _with_outage(settings, case.outage)
    async with _serving(settings, root_path, broker_up=case.outage is not Outage.BROKER) as served:
        response = await served.request(
            case.method, case.path, content=case.body, headers=case.headers(keys)
        )

    assert _answer(response) == ANSWERS["requests"][name]
    assert response.status_code == case.status, response.text
    if case.reads_body is not None:
        assert served.watch.read_before_answer == case.reads_body, (
            "body read, or not, unlike expected"
        )
    if case.status == 200 and case.creates_one:
        _only_score_id(response)
    if case.status == 503:
        assert int(response.headers["retry-after"]) >= 1
    published = [str(score.score_id) for score in await _published_scores(persist_queue)]
    assert len(published) == case.published
    if case.method == "POST" and case.status == 200:
        answered = [score_id.decode() for score_id in UUID_TEXT.findall(response.content)]
        assert sorted(published) == sorted(answered), "published other scores than answered"


# --- What is published -----------------------------------------------------------------------


def _properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    """What a message says besides its body, its own id and its time."""
    return {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": message.headers,
        "delivery_mode": message.delivery_mode,
        "priority": message.priority,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "expiration": message.expiration,
        "type": message.type,
        "user_id": message.user_id,
        "app_id": message.app_id,
    }


MESSAGE_BODIES: dict[str, dict[str, object]] = {
    "every field": score_body(),
    "no evaluation_run_id": _without("evaluation_run_id"),
    "null evaluation_run_id, null value": score_body(evaluation_run_id=None, value=None),
    "nested value": score_body(
        prediction_id="préd-😀",
        scorer=f"weave:///{ENTITY}/{PROJECT}/object/Judge:v3/attr/rubric/key/k",
        value={"é": ["😀", 1, -1.5, 10**30, True, None, {"": ""}], "n": 1.0},
    ),
}


# Through the api's own exchange, which only the api may write to (README, trust model).
EXPECTED_PROPERTIES = {
    "exchange": API_EXCHANGE,
    "routing_key": ROUTING_KEY,
    "content_type": "application/json",
    "content_encoding": None,
    "headers": {"x-delivery-count": 0},  # the quorum queue's
    "delivery_mode": DeliveryMode.PERSISTENT,
    "priority": 0,
    "correlation_id": None,
    "reply_to": None,
    "expiration": None,
    "type": MESSAGE_TYPE,
    "user_id": None,
    "app_id": "score-ingest",
}


@pytest.mark.parametrize("name", MESSAGE_BODIES)
async def test_a_created_score_is_published_as_one_message(
    settings: Settings, api_key: str, persist_queue: AbstractQueue, name: str
) -> None:
    body = MESSAGE_BODIES[name]
    async with _serving(settings) as served:
        response = await served.request(
            "POST", URL, content=_json(body), headers={**basic_auth(api_key), **JSON_TYPE}
        )
        score_id = _only_score_id(response)
        message = await _take_only_message(persist_queue)

    assert _properties(message) == EXPECTED_PROPERTIES
    assert message.message_id == score_id
    assert message.timestamp is not None
    ScoreMessage.model_validate_json(message.body)
    decoded = json.loads(message.body)
    assert decoded.pop("score_id") == score_id
    datetime.fromisoformat(decoded.pop("created_at"))
    assert decoded == {
        "entity": ENTITY,
        "project": PROJECT,
        "prediction_id": body["prediction_id"],
        "scorer": body["scorer"],
        "value": body["value"],
        "evaluation_run_id": body.get("evaluation_run_id"),
        "created_by": api_key.split("_")[1],
    }
    assert list(decoded) == list(
        ["entity", "project", "prediction_id", "scorer", "value", "evaluation_run_id", "created_by"]
    ), "the fields in the message's order"


# --- Metrics ---------------------------------------------------------------------------------


@ROOT_PATHS
async def test_requests_are_counted_by_the_route_template(
    settings: Settings, api_key: str, root_path: str
) -> None:
    async with _serving(settings, root_path) as served:
        before = await scrape(served.client)
        created_ = await served.request(
            "POST", URL, content=VALID, headers={**basic_auth(api_key), **JSON_TYPE}
        )
        assert created_.status_code == 200, created_.text
        unknown = await served.request(
            "POST", URL, content=VALID, headers={**bearer_auth(UNKNOWN_KEY), **JSON_TYPE}
        )
        assert unknown.status_code == 401, unknown.text
        refused = await served.request(
            "POST", URL, content=b"[]", headers={**basic_auth(api_key), **JSON_TYPE}
        )
        assert refused.status_code == 422, refused.text
        after = await scrape(served.client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "score_ingest_http_requests_total"
    for status in ("200", "401", "422"):
        assert delta(requests, method="POST", route=SCORES_ROUTE, status=status) == 1, status
        assert delta(requests, method="POST", route="unmatched", status=status) == 0, status
    assert delta("score_ingest_http_request_seconds_count", route=SCORES_ROUTE) == 3
    assert delta("score_ingest_scores_accepted_total") == 1
    assert _routes(after) <= _routes(before) | {SCORES_ROUTE, "/metrics"}


def _routes(samples: Samples) -> set[str]:
    return {dict(labels)["route"] for _, labels in samples if "route" in dict(labels)}


# --- Bodies that arrive in pieces ------------------------------------------------------------


async def _in_pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@dataclass(frozen=True)
class Streamed:
    """A body sent in pieces, chunked (no Content-Length) or with its length declared."""

    status: int
    body: bytes
    declared: bool
    idempotency_key: str | None = None


# Pieces of 5 bytes split the multi-byte characters of "é😀" too.
UNICODE = _json(score_body(value={"text": "é😀" * 20}))
STREAMED: dict[str, Streamed] = {
    "chunked": Streamed(200, UNICODE, declared=False),
    "declared length": Streamed(200, UNICODE, declared=True),
    "chunked, invalid json": Streamed(422, UNICODE[:-1], declared=False),
    "declared length, invalid json": Streamed(422, UNICODE[:-1], declared=True),
    "chunked, idempotency key": Streamed(200, UNICODE, declared=False, idempotency_key="k"),
    "declared length, idempotency key": Streamed(200, UNICODE, declared=True, idempotency_key="k"),
    "chunked, over the limit": Streamed(
        413, _json(score_body(value="x" * 1024 * 1024)), declared=False
    ),
}


@pytest.mark.parametrize("name", STREAMED)
async def test_a_body_in_pieces_is_read_whole(
    settings: Settings, api_key: str, persist_queue: AbstractQueue, name: str
) -> None:
    case = STREAMED[name]
    headers = {**basic_auth(api_key), **JSON_TYPE}
    if case.declared:
        headers["Content-Length"] = str(len(case.body))
    if case.idempotency_key is not None:
        headers["Idempotency-Key"] = case.idempotency_key
    async with _serving(settings) as served:
        response = await served.request(
            "POST", URL, content=_in_pieces(case.body, 5), headers=headers
        )
    sent = response.request.headers
    assert ("content-length" in sent) == case.declared
    assert ("transfer-encoding" in sent) != case.declared

    assert response.status_code == case.status, response.text
    assert _answer(response) == ANSWERS["streamed"][name]
    scores = await _published_scores(persist_queue)
    if case.status != 200:
        assert scores == []
        return
    assert [str(score.score_id) for score in scores] == [_only_score_id(response)]
    sent_body = json.loads(case.body)
    assert scores[0].value == sent_body["value"]
    assert scores[0].prediction_id == sent_body["prediction_id"]


# --- One path, wherever the api is served ----------------------------------------------------


async def test_behind_a_path_prefix_a_real_server_creates_and_refuses(
    settings: Settings, api_key: str, persist_queue: AbstractQueue
) -> None:
    """`score-ingest api` with API_ROOT_PATH (uvicorn's root_path), as behind a proxy that
    serves it under the prefix and strips it."""
    async with (
        api_process(settings.model_copy(update={"api_root_path": PREFIX})) as api,
        httpx.AsyncClient(base_url=api.base_url, timeout=5) as client,
    ):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (await client.get("/readyz")).status_code != 200:
            assert loop.time() < deadline, "the api did not get ready"
            await asyncio.sleep(0.05)
        before = await scrape(client)
        headers = {**basic_auth(api_key), **JSON_TYPE}
        created_ = await client.post(URL, content=VALID, headers=headers)
        unknown = await client.post(
            URL, content=VALID, headers={**bearer_auth(UNKNOWN_KEY), **JSON_TYPE}
        )
        refused = await client.post(URL, content=b"[]", headers=headers)
        batch = await client.post(
            f"{URL}/batch", content=_json({"scores": [score_body()]}), headers=headers
        )
        document = (await client.get("/openapi.json")).json()
        after = await scrape(client)

    # The server does not name itself (cli/main.py).
    assert "server" not in created_.headers
    assert "server" not in refused.headers
    score_id = _only_score_id(created_)
    for response, name in ((unknown, "unknown key"), (refused, "json array")):
        recorded = ANSWERS["requests"][name]
        assert response.status_code == recorded["status"], response.text
        assert response.content == recorded["body"].encode()
    assert batch.status_code == 200, batch.text
    published = [str(score.score_id) for score in await _published_scores(persist_queue)]
    assert sorted(published) == sorted([score_id, *batch.json()["score_ids"]])
    requests = "score_ingest_http_requests_total"
    for status in ("200", "401", "422"):
        counted = sample(after, requests, method="POST", route=SCORES_ROUTE, status=status)
        assert (
            counted - sample(before, requests, method="POST", route=SCORES_ROUTE, status=status)
            == 1
        )
    assert document["servers"] == [{"url": PREFIX}]
    assert "post" in document["paths"][SCORES_ROUTE]


def test_the_app_is_fastapis_stack_less_its_idle_layers() -> None:
    """api/app.py takes FastAPI's telemetry and body-limit layers out; every other layer stays."""
    layer: Any = create_app(Settings()).build_middleware_stack()
    layers = []
    while not isinstance(layer, APIRouter):
        layers.append(type(layer))
        layer = layer.app
    assert layers == [
        ServerErrorMiddleware,
        RequestContextMiddleware,
        RequestGate,
        ExceptionMiddleware,
        AsyncExitStackMiddleware,
    ]


def test_the_app_documents_the_writes_as_write_routes() -> None:
    routes = create_app(Settings()).router.routes
    writes = [route for route in routes if isinstance(route, WriteRoute)]
    assert writes == scores.writes.routes
    assert [(route.path, route.methods) for route in writes] == [
        (SCORES_ROUTE, {"POST"}),
        (f"{SCORES_ROUTE}/batch", {"POST"}),
    ]


async def _endpoint_with_a_query(
    scope: ProjectScopeDep, body: ScoreCreateBody, limit: Annotated[int, Query()] = 1
) -> ScoreCreateRes:
    raise AssertionError("never called")


async def _endpoint_without_a_scope(body: ScoreCreateBody) -> ScoreCreateRes:
    raise AssertionError("never called")


async def _rate_limit() -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("endpoint", "extra"),
    [
        (_endpoint_with_a_query, {}),
        (_endpoint_without_a_scope, {}),
        (scores.score_create, {"dependencies": [Depends(_rate_limit)]}),
    ],
    ids=["a query parameter", "no project scope", "a dependency of the route"],
)
def test_a_write_route_refuses_an_endpoint_it_could_not_serve_whole(
    endpoint: Callable[..., Any], extra: dict[str, Any]
) -> None:
    with pytest.raises(TypeError, match="a WriteRoute calls its endpoint with"):
        WriteRoute(scores.CREATE_PATH, endpoint, methods=["POST"], **extra)
