"""Request validation: a refusal is a 422 naming the field and publishes nothing; never a 5xx."""

import json
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractQueue
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from api.keys import create_key
from shared.contract import ScoreMessage
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from worker.decode import row_of
from worker.store import ScoreStore

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
SCORER_PREFIX = f"weave:///{ENTITY}/{PROJECT}/object/"


def _raw(body: object) -> bytes:
    """body as JSON the way a careless client writes it: NaN/Infinity literals, lone surrogates."""
    return json.dumps(body).encode()


def _with_raw_value(raw_value: str) -> bytes:
    """A valid body whose `value` is the given JSON text, spliced in verbatim."""
    return _raw(score_body(value="VALUE")).replace(b'"VALUE"', raw_value.encode())


def _without(field: str) -> bytes:
    body = score_body()
    del body[field]
    return _raw(body)


def _nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _scorer_of_length(length: int) -> str:
    """A well-formed object reference exactly length characters long."""
    name_length = length - len(f"{SCORER_PREFIX}:digest")
    return f"{SCORER_PREFIX}{'x' * name_length}:digest"


def _validation_errors(response: httpx.Response) -> list[dict[str, Any]]:
    """The errors of a 422 in FastAPI's HTTPValidationError shape."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["detail"]
    errors: list[dict[str, Any]] = body["detail"]
    assert isinstance(errors, list)
    assert errors
    for error in errors:
        assert isinstance(error["loc"], list)
        assert all(isinstance(part, str | int) for part in error["loc"])
        assert isinstance(error["msg"], str)
        assert error["msg"]
        assert isinstance(error["type"], str)
    return errors


def _assert_validation_error(response: httpx.Response, loc: list[str | int]) -> None:
    """A 422 in FastAPI's HTTPValidationError shape, with an error located at loc."""
    errors = _validation_errors(response)
    assert loc in [error["loc"] for error in errors], errors


async def _assert_nothing_published(queue: AbstractQueue) -> None:
    message = await queue.get(no_ack=True, fail=False)
    assert message is None, f"published despite the refusal: {message.body!r}"


INVALID_BODIES: dict[str, tuple[bytes, list[str | int]]] = {
    "missing prediction_id": (_without("prediction_id"), ["body", "prediction_id"]),
    "missing scorer": (_without("scorer"), ["body", "scorer"]),
    "missing value": (_without("value"), ["body", "value"]),
    "empty prediction_id": (_raw(score_body(prediction_id="")), ["body", "prediction_id"]),
    "prediction_id not a string": (_raw(score_body(prediction_id=42)), ["body", "prediction_id"]),
    "prediction_id of 257 chars": (
        _raw(score_body(prediction_id="p" * 257)),
        ["body", "prediction_id"],
    ),
    "NUL in prediction_id": (
        _raw(score_body(prediction_id="pred\x00-1")),
        ["body", "prediction_id"],
    ),
    "scorer over http": (
        _raw(score_body(scorer="http://example.com/op/x:1")),
        ["body", "scorer"],
    ),
    "scorer to a table": (_raw(score_body(scorer="weave:///e/p/table/x")), ["body", "scorer"]),
    "scorer without digest": (
        _raw(score_body(scorer=f"{SCORER_PREFIX}exact_match")),
        ["body", "scorer"],
    ),
    "scorer with empty digest": (
        _raw(score_body(scorer=f"{SCORER_PREFIX}exact_match:")),
        ["body", "scorer"],
    ),
    "scorer of wrong kind": (
        _raw(score_body(scorer=f"weave:///{ENTITY}/{PROJECT}/call/exact_match:abc")),
        ["body", "scorer"],
    ),
    "scorer without project": (
        _raw(score_body(scorer=f"weave:///{ENTITY}/op/exact_match:abc")),
        ["body", "scorer"],
    ),
    "scorer with odd extra path": (
        _raw(score_body(scorer=f"{SCORER_PREFIX}judge:abc/attr")),
        ["body", "scorer"],
    ),
    "scorer with bad edge name": (
        _raw(score_body(scorer=f"{SCORER_PREFIX}judge:abc/field/rubric")),
        ["body", "scorer"],
    ),
    "scorer with non-integer index": (
        _raw(score_body(scorer=f"{SCORER_PREFIX}judge:abc/index/first")),
        ["body", "scorer"],
    ),
    "scorer of 2049 chars": (_raw(score_body(scorer=_scorer_of_length(2049))), ["body", "scorer"]),
    "scorer not a string": (_raw(score_body(scorer=["weave:///a/b/op/c:d"])), ["body", "scorer"]),
    "NUL in a value string": (
        _raw(score_body(value={"outer": {"inner": ["ok", "bad\x00"]}})),
        ["body", "value"],
    ),
    "NUL in a value key": (_raw(score_body(value={"ke\x00y": 1})), ["body", "value"]),
    "NUL as the value": (_raw(score_body(value="\x00")), ["body", "value"]),
    "NaN in value": (_with_raw_value("NaN"), ["body", "value"]),
    "Infinity in value": (_with_raw_value("Infinity"), ["body", "value"]),
    "-Infinity in value": (_with_raw_value("-Infinity"), ["body", "value"]),
    "NaN nested in value": (_with_raw_value('{"scores": [1, NaN]}'), ["body", "value"]),
    "1e400 in value": (_with_raw_value("1e400"), ["body", "value"]),
    "-1e400 in value": (_with_raw_value("-1e400"), ["body", "value"]),
    "integer of 1001 digits": (_with_raw_value("9" * 1001), ["body", "value"]),
    "value nested 65 deep": (_raw(score_body(value=_nested(65))), ["body", "value"]),
    "evaluation_run_id a number": (
        _raw(score_body(evaluation_run_id=5)),
        ["body", "evaluation_run_id"],
    ),
    "evaluation_run_id a list": (
        _raw(score_body(evaluation_run_id=["run-1"])),
        ["body", "evaluation_run_id"],
    ),
    "evaluation_run_id empty": (
        _raw(score_body(evaluation_run_id="")),
        ["body", "evaluation_run_id"],
    ),
    "evaluation_run_id with NUL": (
        _raw(score_body(evaluation_run_id="run\x00")),
        ["body", "evaluation_run_id"],
    ),
    "body a JSON array": (_raw([score_body()]), ["body"]),
    "body a JSON string": (_raw("score"), ["body"]),
    "body null": (b"null", ["body"]),
    "body empty": (b"", ["body"]),
}


@pytest.mark.parametrize("case", INVALID_BODIES)
async def test_invalid_body_is_422_naming_the_field(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    persist_queue: AbstractQueue,
    case: str,
) -> None:
    content, loc = INVALID_BODIES[case]
    response = await client.post(URL, content=content, headers=headers)

    _assert_validation_error(response, loc)
    await _assert_nothing_published(persist_queue)


async def test_body_without_a_json_content_type_is_422(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue
) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await client.post(
            URL,
            content=_raw(score_body()),
            headers={**basic_auth(api_key), "Content-Type": content_type},
        )
        _assert_validation_error(response, ["body"])
    await _assert_nothing_published(persist_queue)


async def test_json_content_type_may_name_its_charset(
    client: httpx.AsyncClient, api_key: str
) -> None:
    response = await client.post(
        URL,
        content=_raw(score_body()),
        headers={**basic_auth(api_key), "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200, response.text


NOT_JSON_BODIES: dict[str, bytes] = {
    "form encoded": b"prediction_id=p1&scorer=x",
    "truncated": _raw(score_body())[:-1],
    "trailing garbage": _raw(score_body()) + b"}",
    "single quotes": _raw(score_body()).replace(b'"', b"'"),
}


# What the JSON decoder itself refuses (the worker decodes with the same parser): a 422
# json_invalid whose loc is the offset in the body and whose msg says what is wrong there.
UNDECODABLE_BODIES: dict[str, tuple[bytes, str]] = {
    "lone surrogate in prediction_id": (
        _raw(score_body(prediction_id="pred-\ud800")),
        "hex escape",
    ),
    "lone surrogate in value": (_raw(score_body(value="\ud800")), "hex escape"),
    "lone low surrogate in a value key": (_raw(score_body(value={"\udfff": "x"})), "surrogate"),
    "integer of 5000 digits": (_with_raw_value("9" * 5000), "number out of range"),
    "value nested 10000 deep": (
        _with_raw_value("[" * 10_000 + "]" * 10_000),
        "recursion limit exceeded",
    ),
    "not UTF-8": (_with_raw_value('"@@"').replace(b"@@", b"\xff\xfe"), "invalid unicode"),
}


@pytest.mark.parametrize("case", UNDECODABLE_BODIES)
async def test_undecodable_body_is_422_json_invalid_saying_why(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    persist_queue: AbstractQueue,
    case: str,
) -> None:
    content, reason = UNDECODABLE_BODIES[case]
    response = await client.post(URL, content=content, headers=headers)

    (error,) = _validation_errors(response)
    assert error["type"] == "json_invalid"
    assert error["loc"][0] == "body"
    assert isinstance(error["loc"][1], int)
    assert 0 < error["loc"][1] < len(content)
    assert reason.lower() in error["msg"].lower(), error["msg"]
    await _assert_nothing_published(persist_queue)


@pytest.mark.parametrize("case", NOT_JSON_BODIES)
async def test_body_that_is_not_json_is_422(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    persist_queue: AbstractQueue,
    case: str,
) -> None:
    response = await client.post(URL, content=NOT_JSON_BODIES[case], headers=headers)

    errors = _validation_errors(response)
    assert all(error["loc"][0] == "body" for error in errors), errors
    await _assert_nothing_published(persist_queue)


INVALID_PATHS: dict[str, tuple[str, str, list[str | int]]] = {
    "colon in entity": ("ac:me", PROJECT, ["path", "entity"]),
    "colon in project": (ENTITY, "ev:als", ["path", "project"]),
    "NUL in entity": ("acme%00", PROJECT, ["path", "entity"]),
    "NUL in project": (ENTITY, "%00", ["path", "project"]),
    "percent in project": (ENTITY, "ev%25als", ["path", "project"]),
    "tab in project": (ENTITY, "ev%09als", ["path", "project"]),
    "backslash in entity": ("ac%5Cme", PROJECT, ["path", "entity"]),
    "entity of 129 chars": ("e" * 129, PROJECT, ["path", "entity"]),
    "project of 129 chars": (ENTITY, "p" * 129, ["path", "project"]),
}


@pytest.mark.parametrize("case", INVALID_PATHS)
async def test_invalid_path_is_422_naming_the_parameter(
    client: httpx.AsyncClient, api_key: str, persist_queue: AbstractQueue, case: str
) -> None:
    entity, project, loc = INVALID_PATHS[case]
    response = await client.post(
        f"/v2/{entity}/{project}/scores", json=score_body(), headers=basic_auth(api_key)
    )
    _assert_validation_error(response, loc)
    await _assert_nothing_published(persist_queue)


VALID_EDGES: dict[str, bytes] = {
    "prediction_id of 256 chars": _raw(score_body(prediction_id="p" * 256)),
    "prediction_id of 256 emoji": _raw(score_body(prediction_id="🎉" * 256)),
    "prediction_id with control chars": _raw(score_body(prediction_id="a\tb\nc\x01")),
    "scorer of 2048 chars": _raw(score_body(scorer=_scorer_of_length(2048))),
    "op scorer": _raw(score_body(scorer=f"weave:///{ENTITY}/{PROJECT}/op/exact_match:abc")),
    "scorer with extra path": _raw(
        score_body(scorer=f"{SCORER_PREFIX}judge:abc/attr/rubric/key/en/index/-1/id/x")
    ),
    "scorer of another project": _raw(score_body(scorer=f"weave:///{ENTITY}/place/op/f:1")),
    "evaluation_run_id null": _raw(score_body(evaluation_run_id=None)),
    "value nested 64 deep": _raw(score_body(value=_nested(64))),
    "value null": _raw(score_body(value=None)),
    "integer of 1000 digits": _with_raw_value("9" * 1000),
    "tiny float underflowing to 0": _with_raw_value("1e-400"),
    "negative zero": _with_raw_value("-0.0"),
    "escaped NUL as text": _raw(score_body(value="\\u0000")),
    "paired surrogates": _with_raw_value('"\\ud83c\\udf89"'),
}


@pytest.mark.parametrize("case", VALID_EDGES)
async def test_edge_of_the_limits_is_accepted(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    persist_queue: AbstractQueue,
    case: str,
) -> None:
    response = await client.post(URL, content=VALID_EDGES[case], headers=headers)
    assert response.status_code == 200, response.text
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert (
        str(ScoreMessage.model_validate_json(message.body).score_id) == response.json()["score_id"]
    )


async def test_longest_names_are_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    entity = "e" * 128
    _, key = await create_key(db, entity)
    response = await client.post(
        f"/v2/{entity}/{'p' * 128}/scores",
        json=score_body(scorer=f"weave:///{entity}/evals/op/f:1"),
        headers=basic_auth(key),
    )
    assert response.status_code == 200, response.text


async def test_error_message_quotes_the_offending_key_literally(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(
        URL, content=_raw(score_body(value={"{problem}": "bad\x00"})), headers=headers
    )
    _assert_validation_error(response, ["body", "value"])
    assert "{problem}" in response.json()["detail"][0]["msg"]


async def test_unauthenticated_invalid_body_is_401_not_422(
    client: httpx.AsyncClient, persist_queue: AbstractQueue
) -> None:
    response = await client.post(URL, content=b"[]", headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text
    await _assert_nothing_published(persist_queue)


_SPECIAL_CHARS = st.sampled_from(["\x00", "\ud800", "\udfff", "\t", "\n", "\x7f", "🎉", "\ufeff"])
_CHARS = st.one_of(st.characters(codec=None, exclude_categories=()), _SPECIAL_CHARS)
_TEXT = st.text(_CHARS, max_size=12)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(),
    _TEXT,
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


def _storable_text(text: str) -> bool:
    return "\x00" not in text and not any("\ud800" <= char <= "\udfff" for char in text)


def _storable(value: Any) -> bool:
    """What jsonb can hold: no NUL or lone surrogate in any string, only finite numbers."""
    if isinstance(value, str):
        return _storable_text(value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    if isinstance(value, dict):
        return all(_storable_text(key) and _storable(item) for key, item in value.items())
    return True


def _numeric(value: Any) -> Any:
    """value with numbers as Decimals: jsonb keeps a number's value, not its spelling."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, list):
        return [_numeric(item) for item in value]
    return {key: _numeric(item) for key, item in value.items()}


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ScoreStore]:
    """The worker's own store, to prove that what the API accepts PostgreSQL can hold."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        yield ScoreStore(pool)
    finally:
        await pool.close()


@hypothesis_settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=_JSON, prediction_id=st.one_of(_TEXT, st.text(_CHARS, min_size=250, max_size=260)))
async def test_any_input_is_accepted_and_stored_or_refused_with_422(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    persist_queue: AbstractQueue,
    store: ScoreStore,
    db: asyncpg.Connection,
    value: Any,
    prediction_id: str,
) -> None:
    await persist_queue.purge()  # hypothesis replays examples; start each from empty
    content = _raw(score_body(value=value, prediction_id=prediction_id))
    response = await client.post(URL, content=content, headers=headers)

    storable = _storable(value) and _storable_text(prediction_id) and 1 <= len(prediction_id) <= 256
    event(f"status {response.status_code}")
    assert response.status_code == (200 if storable else 422), response.text
    message = await persist_queue.get(no_ack=True, fail=False)
    if response.status_code == 422:
        assert message is None
        return
    assert message is not None
    score = ScoreMessage.model_validate_json(message.body)
    assert str(score.score_id) == response.json()["score_id"]
    assert score.prediction_id == prediction_id
    assert await store.persist_batch([row_of(score)]) == 1
    stored = await db.fetchval("SELECT value::text FROM scores WHERE score_id = $1", score.score_id)
    assert _numeric(json.loads(stored)) == _numeric(value)
