"""The fast path (api/fast_path.py) answers every request as FastAPI's routing does.

Each case goes to two apps built from the same settings but for `api_fast_path`, both
running their lifespan against the real PostgreSQL and RabbitMQ. They must give the same
status, the same headers (but x-request-id) and the same body (but the random score ids),
and publish the same scores. The fast-path app's hand-over to FastAPI is watched, so each
case also shows whether the fast path answered it itself or passed it on.
"""

import asyncio
import base64
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from api.fast_path import ScoreCreateFastPath
from api.keys import create_key, revoke_key
from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE, ScoreBatchMessage, ScoreMessage
from shared.settings import Settings
from shared.topology import API_EXCHANGE
from tests.api.test_health_and_metrics import SCORES_ROUTE, Samples, sample, scrape
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, client_for, score_body
from tests.support.processes import free_port

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
JSON_TYPE = {"Content-Type": "application/json"}
UNKNOWN_KEY = f"si_{'0' * 16}_{'A' * 43}"
UUID_TEXT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _json(body: object) -> bytes:
    """body as a client writes it (json.dumps writes NaN and lone surrogates too)."""
    return json.dumps(body).encode()


def _without(name: str) -> dict[str, object]:
    body = score_body()
    del body[name]
    return body


VALID = _json(score_body())


# --- Two apps, one with the fast path, watched ----------------------------------------------


class PassedOn:
    """Sits where the fast path hands requests on to FastAPI, and counts them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count an HTTP request, then hand it on unchanged."""
        if scope["type"] == "http":
            self.count += 1
        await self.app(scope, receive, send)


def _middleware_layers(application: FastAPI) -> Iterator[object]:
    """Each layer of the app's middleware stack, built now as its first request would."""
    if application.middleware_stack is None:
        application.middleware_stack = application.build_middleware_stack()
    layer: object = application.middleware_stack
    while layer is not None and layer is not application.router:
        yield layer
        layer = getattr(layer, "app", None)


def _watch_fast_path(application: FastAPI) -> PassedOn | None:
    """Put a PassedOn behind the app's fast path; None when the app has no fast path."""
    found = [
        layer for layer in _middleware_layers(application) if isinstance(layer, ScoreCreateFastPath)
    ]
    if not found:
        return None
    (fast_path,) = found
    passed_on = PassedOn(fast_path.app)
    fast_path.app = passed_on
    return passed_on


@dataclass(frozen=True)
class Served:
    """A client of a running app, and what its fast path passed on (None: no fast path)."""

    client: httpx.AsyncClient
    passed_on: PassedOn | None

    @property
    def handed_on_count(self) -> int:
        """Requests the fast path passed on so far."""
        assert self.passed_on is not None, "this app has no fast path"
        return self.passed_on.count


@contextlib.asynccontextmanager
async def _serving(
    settings: Settings, *, fast_path: bool, broker_up: bool = True
) -> AsyncIterator[Served]:
    """The app on settings with the fast path on or off, its lifespan running (as in
    tests.conftest.running_app, which also waits for the broker: here only when it is up)."""
    application = create_app(settings.model_copy(update={"api_fast_path": fast_path}))
    passed_on = _watch_fast_path(application)
    assert (passed_on is not None) == fast_path, "api_fast_path does not switch the fast path"
    async with application.router.lifespan_context(application):
        if broker_up:
            publisher = application.state.services.publisher
            await asyncio.wait_for(publisher.wait_ready(), timeout=10)
        async with client_for(application) as client:
            yield Served(client, passed_on)


@contextlib.asynccontextmanager
async def _both(
    settings: Settings, *, broker_up: bool = True
) -> AsyncIterator[tuple[Served, Served]]:
    """(with the fast path, without): two apps on the same settings but for api_fast_path."""
    async with (
        _serving(settings, fast_path=True, broker_up=broker_up) as fast,
        _serving(settings, fast_path=False, broker_up=broker_up) as routed,
    ):
        yield fast, routed


class Outage(Enum):
    """A service the apps are pointed away from: nothing listens on the port they get."""

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


# --- Comparing answers and what was published -----------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What must be the same either way: the status, the headers but x-request-id (as a
    sorted list: repeated headers count), and the body with any score id masked in a 200."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _answer(response: httpx.Response) -> Answer:
    headers = sorted(
        (name, value) for name, value in response.headers.multi_items() if name != "x-request-id"
    )
    body = response.content
    if response.status_code == 200:
        body = UUID_TEXT.sub(b"<uuid>", body)
    return Answer(response.status_code, headers, body)


def _assert_same(with_fast_path: httpx.Response, without: httpx.Response) -> None:
    """Both answers alike; on a difference, show both in full."""
    fast_answer, routed_answer = _answer(with_fast_path), _answer(without)
    assert fast_answer == routed_answer, (
        f"with the fast path: {fast_answer}\nwithout the fast path: {routed_answer}"
    )


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
    """One request, the status both apps must answer it with, and whether the fast-path
    app hands it on to FastAPI's routing (False: answered before, by the fast path itself
    or, for a path, key, charset or size it refuses before reading the body, by the
    request gate)."""

    status: int
    handed_on: bool
    headers: Headers = VALID_KEY
    body: bytes = VALID
    method: str = "POST"
    path: str = URL
    outage: Outage | None = None
    published: int = 0  # scores each app publishes

    @property
    def creates_one(self) -> bool:
        """Whether this is a POST to the create path."""
        return self.method == "POST" and urlsplit(self.path).path == URL


def created(headers: Headers = VALID_KEY, body: bytes = VALID, path: str = URL) -> Case:
    """A score the fast path creates: 200, one score published."""
    return Case(200, False, headers, body, path=path, published=1)


def handed_on(status: int, body: bytes = VALID, headers: Headers = VALID_KEY) -> Case:
    """A POST to the create path that the fast path hands on; FastAPI answers status."""
    return Case(status, True, headers, body)


def kept(status: int, headers: Headers, outage: Outage | None = None, body: bytes = VALID) -> Case:
    """A POST to the create path answered with status before FastAPI: its key or charset
    (by the request gate, before the body is read), or an outage."""
    return Case(status, False, headers, body, outage=outage)


def _with_key(key: Callable[[Keys], str], auth: Callable[[str], dict[str, str]]) -> Headers:
    return lambda keys: {**auth(key(keys)), **JSON_TYPE}


CASES: dict[str, Case] = {
    # Valid requests, answered 200 by the fast path.
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
    # Both read Basic credentials with a lenient base64 decoder, which skips such characters.
    "basic with characters outside base64": created(
        _authorization(lambda k: f"Basic !{_b64('api:' + k.valid)}!")
    ),
    # Keys that fail: in the header (FastAPI's HTTPBasic/HTTPBearer refuse it), or the key.
    "no authorization": kept(401, lambda k: dict(JSON_TYPE)),
    "basic not base64": kept(401, _authorization(lambda k: "Basic !!!not-base64!!!")),
    "basic without colon": kept(401, _authorization(lambda k: f"Basic {_b64(k.valid)}")),
    "basic not ascii": kept(401, _authorization(lambda k: f"Basic {_b64('api:' + k.valid + 'é')}")),
    "empty bearer": kept(401, _authorization(lambda k: "Bearer ")),
    "unknown scheme": kept(401, _authorization(lambda k: "Token x")),
    "basic, empty password": kept(401, _with_key(lambda k: "", basic_auth)),
    "unknown key": kept(401, _with_key(lambda k: UNKNOWN_KEY, bearer_auth)),
    "malformed key": kept(401, _with_key(lambda k: "not-an-api-key", basic_auth)),
    "revoked key": kept(401, _with_key(lambda k: k.revoked, basic_auth)),
    "key of another entity": kept(403, _with_key(lambda k: k.other_entity, bearer_auth)),
    "key of another project": kept(403, _with_key(lambda k: k.other_project, basic_auth)),
    # Bodies, content types and paths that FastAPI refuses.
    "missing prediction_id": handed_on(422, _json(_without("prediction_id"))),
    "prediction_id a number": handed_on(422, _json(score_body(prediction_id=42))),
    "empty evaluation_run_id": handed_on(422, _json(score_body(evaluation_run_id=""))),
    "bad scorer ref": handed_on(422, _json(score_body(scorer="weave:///not/a/ref"))),
    "NUL in value": handed_on(422, _json(score_body(value={"a": "x\u0000y"}))),
    "NUL in prediction_id": handed_on(422, _json(score_body(prediction_id="p\u0000"))),
    "invalid json": handed_on(422, VALID[:-1]),
    "empty body": handed_on(422, b""),
    "json array": handed_on(422, _json([score_body()])),
    "json string": handed_on(422, _json("score")),
    "NaN literal": handed_on(422, _json(score_body(value=float("nan")))),
    "number overflowing to infinity": handed_on(422, VALID.replace(b"0.75", b"1e400")),
    # FastAPI (strict_content_type, its default) does not read a body without a content
    # type as JSON.
    "no content type": handed_on(422, headers=_valid_key(None)),
    "empty content type": handed_on(422, headers=_valid_key("")),
    "text/plain": handed_on(422, headers=_valid_key("text/plain")),
    "form urlencoded": handed_on(422, headers=_valid_key("application/x-www-form-urlencoded")),
    # Names are checked before the key, as FastAPI's route checks them, but by the request
    # gate, before the body is read.
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
    "project not UTF-8, GET": Case(
        422, False, body=b"", method="GET", path=f"/v2/{ENTITY}/%ff/scores"
    ),
    "percent-encoded UTF-8 project": created(path=f"/v2/{ENTITY}/%C3%A9vals/scores"),
    # The key is checked before the body is read: a body is never decoded for a bad key.
    "invalid body, unknown key": kept(
        401, _with_key(lambda k: UNKNOWN_KEY, bearer_auth), body=_json(score_body(scorer="nope"))
    ),
    "invalid body, key of another entity": kept(
        403, _with_key(lambda k: k.other_entity, basic_auth), body=b"[]"
    ),
    "invalid json, no key": kept(401, lambda k: dict(JSON_TYPE), body=b"{"),
    "body over the limit, no key": kept(
        401, lambda k: dict(JSON_TYPE), body=_json(score_body(value="x" * 1024 * 1024))
    ),
    # Bodies are read as UTF-8 only: another charset is refused, after the key.
    "charset latin-1": kept(415, _valid_key("application/json; charset=latin-1")),
    "charset utf-16": kept(415, _valid_key("application/json; charset=utf-16")),
    "quoted charset iso-8859-1": kept(415, _valid_key('application/json; charset="ISO-8859-1"')),
    "text/plain, charset latin-1": kept(415, _valid_key("text/plain; charset=latin-1")),
    "charset latin-1, unknown key": kept(
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
    "+json content type": Case(200, True, _valid_key("application/vnd.api+json"), published=1),
    # The second app's request reuses the first's key: the same score id, published again.
    "idempotency key": Case(200, True, _valid_key(**{"Idempotency-Key": "retry-1"}), published=1),
    "invalid idempotency key": handed_on(422, headers=_valid_key(**{"Idempotency-Key": "a b"})),
    "body over the limit": Case(413, False, body=_json(score_body(value="x" * 1024 * 1024))),
    # Near the create path, but not it.
    # No redirect (its Location would be built from the Host header): not found.
    "trailing slash": Case(404, True, path=f"{URL}/"),
    "trailing slash, batch": Case(404, True, path=f"{URL}/batch/"),
    "batch": Case(
        200,
        True,
        body=_json({"scores": [score_body(), score_body(prediction_id="p-2")]}),
        path=f"{URL}/batch",
        published=2,
    ),
    "GET the create path": Case(200, True, body=b"", method="GET"),
    "GET the create path without a key": Case(401, True, lambda k: {}, b"", method="GET"),
    "PUT the create path": Case(405, True, method="PUT"),
    "HEAD the create path": Case(405, True, method="HEAD", body=b""),
    "extra segment inside": Case(404, True, path=f"/v2/{ENTITY}/{PROJECT}/x/scores"),
    "extra segment after": Case(405, True, path=f"{URL}/x"),
    "encoded slash in the entity": Case(404, True, path=f"/v2/a%2Fb/{PROJECT}/scores"),
    "empty entity": Case(404, True, path=f"/v2//{PROJECT}/scores"),
    "v1": Case(404, True, path=f"/v1/{ENTITY}/{PROJECT}/scores"),
    # Services down: the same 503 with Retry-After, or the same answer that comes first.
    "broker down": kept(503, VALID_KEY, Outage.BROKER),
    "broker down, bearer": kept(503, _with_key(lambda k: k.valid, bearer_auth), Outage.BROKER),
    "broker down, batch": Case(
        503, True, body=_json({"scores": [score_body()]}), path=f"{URL}/batch", outage=Outage.BROKER
    ),
    "broker down, invalid body": replace(handed_on(422, b"[]"), outage=Outage.BROKER),
    "database down, uncached key": kept(503, VALID_KEY, Outage.DATABASE),
    "database down, malformed key": kept(
        401, _with_key(lambda k: "not-an-api-key", basic_auth), Outage.DATABASE
    ),
    "database down, invalid body": kept(503, VALID_KEY, Outage.DATABASE, body=b"[]"),
}


async def _send(served: Served, case: Case, keys: Keys) -> httpx.Response:
    return await served.client.request(
        case.method, case.path, content=case.body, headers=case.headers(keys)
    )


@pytest.mark.parametrize("name", CASES)
async def test_both_ways_give_the_same_answer(
    settings: Settings, keys: Keys, persist_queue: AbstractQueue, name: str
) -> None:
    case = CASES[name]
    settings = _with_outage(settings, case.outage)
    async with _both(settings, broker_up=case.outage is not Outage.BROKER) as (fast, routed):
        with_fast_path = await _send(fast, case, keys)
        without = await _send(routed, case, keys)

    _assert_same(with_fast_path, without)
    assert with_fast_path.status_code == case.status, with_fast_path.text
    assert fast.handed_on_count == int(case.handed_on), "handed on, or not, unlike expected"
    if case.status == 200 and case.creates_one:
        _only_score_id(with_fast_path)
        _only_score_id(without)
    if case.status == 503:
        assert int(with_fast_path.headers["retry-after"]) >= 1
    published = [str(score.score_id) for score in await _published_scores(persist_queue)]
    assert len(published) == 2 * case.published
    answered = [
        score_id.decode()
        for response in (with_fast_path, without)
        if response.status_code == 200 and case.method == "POST"
        for score_id in UUID_TEXT.findall(response.content)
    ]
    assert sorted(published) == sorted(answered), "published other scores than answered"


def test_api_fast_path_false_in_the_environment_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("API_FAST_PATH", raising=False)
    assert Settings().api_fast_path is True
    assert _watch_fast_path(create_app(Settings())) is not None
    monkeypatch.setenv("API_FAST_PATH", "false")
    assert Settings().api_fast_path is False
    assert _watch_fast_path(create_app(Settings())) is None


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


@pytest.mark.parametrize("name", MESSAGE_BODIES)
async def test_both_ways_publish_the_same_message(
    settings: Settings, api_key: str, persist_queue: AbstractQueue, name: str
) -> None:
    body = MESSAGE_BODIES[name]
    published: list[tuple[str, AbstractIncomingMessage]] = []
    async with _both(settings) as (fast, routed):
        for served in (fast, routed):
            response = await served.client.post(
                URL, content=_json(body), headers={**basic_auth(api_key), **JSON_TYPE}
            )
            published.append((_only_score_id(response), await _take_only_message(persist_queue)))
        assert fast.handed_on_count == 0, "the fast path did not answer"

    (_, with_fast_path), (_, without) = published
    assert _properties(with_fast_path) == _properties(without)
    fields = []
    for score_id, message in published:
        assert message.type == MESSAGE_TYPE
        assert message.exchange == API_EXCHANGE
        assert message.content_type == "application/json"
        assert message.delivery_mode == 2
        assert message.message_id == score_id
        assert message.timestamp is not None
        ScoreMessage.model_validate_json(message.body)
        decoded = json.loads(message.body)
        assert decoded.pop("score_id") == score_id
        datetime.fromisoformat(decoded.pop("created_at"))
        fields.append(decoded)
    assert list(fields[0]) == list(fields[1]), "the same fields in the same order"
    assert fields[0] == fields[1]
    assert fields[0] == {
        "entity": ENTITY,
        "project": PROJECT,
        "prediction_id": body["prediction_id"],
        "scorer": body["scorer"],
        "value": body["value"],
        "evaluation_run_id": body.get("evaluation_run_id"),
        "created_by": api_key.split("_")[1],
    }


# --- Metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False], ids=["with the fast path", "without"])
async def test_requests_are_counted_by_the_route_template(
    settings: Settings, api_key: str, fast_path: bool
) -> None:
    async with _serving(settings, fast_path=fast_path) as served:
        before = await scrape(served.client)
        handed_on_before = served.handed_on_count if fast_path else 0
        created = await served.client.post(
            URL, content=VALID, headers={**basic_auth(api_key), **JSON_TYPE}
        )
        assert created.status_code == 200, created.text
        unknown = await served.client.post(
            URL, content=VALID, headers={**bearer_auth(UNKNOWN_KEY), **JSON_TYPE}
        )
        assert unknown.status_code == 401, unknown.text
        if fast_path:
            assert served.handed_on_count == handed_on_before, "the fast path did not answer"
        after = await scrape(served.client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "score_ingest_http_requests_total"
    for status in ("200", "401"):
        assert delta(requests, method="POST", route=SCORES_ROUTE, status=status) == 1, status
        assert delta(requests, method="POST", route="unmatched", status=status) == 0, status
    assert delta("score_ingest_http_request_seconds_count", route=SCORES_ROUTE) == 2
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
    handed_on: bool
    body: bytes
    declared: bool
    idempotency_key: str | None = None


# Pieces of 5 bytes split the multi-byte characters of "é😀" too.
UNICODE = _json(score_body(value={"text": "é😀" * 20}))
STREAMED: dict[str, Streamed] = {
    "chunked": Streamed(200, False, UNICODE, declared=False),
    "declared length": Streamed(200, False, UNICODE, declared=True),
    "chunked, invalid json": Streamed(422, True, UNICODE[:-1], declared=False),
    "declared length, invalid json": Streamed(422, True, UNICODE[:-1], declared=True),
    # Handed on because of the Idempotency-Key: FastAPI must get the whole body again.
    "chunked, idempotency key": Streamed(200, True, UNICODE, declared=False, idempotency_key="k"),
    "declared length, idempotency key": Streamed(
        200, True, UNICODE, declared=True, idempotency_key="k"
    ),
    "chunked, over the limit": Streamed(
        413, False, _json(score_body(value="x" * 1024 * 1024)), declared=False
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
    responses = []
    async with _both(settings) as (fast, routed):
        for served in (fast, routed):
            response = await served.client.post(
                URL, content=_in_pieces(case.body, 5), headers=headers
            )
            sent = response.request.headers
            assert ("content-length" in sent) == case.declared
            assert ("transfer-encoding" in sent) != case.declared
            responses.append(response)
        assert fast.handed_on_count == int(case.handed_on), "handed on, or not, unlike expected"

    with_fast_path, without = responses
    assert with_fast_path.status_code == case.status, with_fast_path.text
    _assert_same(with_fast_path, without)
    scores = await _published_scores(persist_queue)
    if case.status != 200:
        assert scores == []
        return
    answered = sorted(_only_score_id(response) for response in responses)
    assert sorted(str(score.score_id) for score in scores) == answered
    sent_body = json.loads(case.body)
    for score in scores:
        assert score.value == sent_body["value"]
        assert score.prediction_id == sent_body["prediction_id"]
