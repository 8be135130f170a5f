"""Traces (README "Tracing"): a client's traceparent through the api and the broker to the
worker's store span, seen by an in-process OTLP receiver; and nothing at all without one."""

import asyncio
import contextvars
import io
import json
import logging
import os
import threading
from typing import cast

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from api.metrics import RequestContextMiddleware
from api.tracing import RequestSpan
from shared.logs import JsonFormatter
from shared.settings import Settings
from shared.tracing import (
    TRACEPARENT_HEADER,
    TRACEPARENTS_HEADER,
    Tracing,
    current_traceparent,
    parse_traceparent,
)
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    client_for,
    running_app,
    score_body,
    wait_for_count,
)
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import running_worker, score_message

URL = f"/v2/{ENTITY}/{PROJECT}/scores"
SERVER, CONSUMER, CLIENT = 2, 5, 3  # OTLP span kinds


def _traceparent() -> tuple[str, str, str]:
    """A fresh sampled traceparent, with its trace id and span id."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _published_headers(message: AbstractIncomingMessage) -> dict[str, object]:
    """A message's headers as published (without x-delivery-count, the quorum queue's)."""
    return {name: value for name, value in message.headers.items() if not name.startswith("x-")}


def _of(span: ReceivedSpan) -> str:
    """The traceparent naming an exported span, sampled (its new traces say their ids are
    random too: flag 0x02, W3C Trace Context level 2)."""
    flags = "01" if span.parent_span_id else "03"
    return f"00-{span.trace_id}-{span.span_id}-{flags}"


def _api(span: ReceivedSpan) -> bool:
    return span.service == "score-ingest-api"


def _store(span: ReceivedSpan) -> bool:
    return span.service == "score-ingest-worker" and span.name == "store"


async def test_a_score_posted_with_a_traceparent_is_one_trace_from_the_api_to_the_worker(
    traced: Settings, receiver: OtlpReceiver, api_key: str, db: asyncpg.Connection
) -> None:
    traceparent, trace_id, client_span_id = _traceparent()
    async with running_worker(traced), running_app(traced) as app, client_for(app) as client:
        response = await client.post(
            URL,
            json=score_body(),
            headers={**basic_auth(api_key), "traceparent": traceparent},
        )
        assert response.status_code == 200, response.text
        score_id = response.json()["score_id"]
        query = "SELECT count(*) FROM scores WHERE score_id = $1"
        assert await wait_for_count(db, query, 1, score_id) == 1
    # Both have stopped: their exporters sent every span on the way out.

    (api_span,) = receiver.received(_api)
    assert api_span.trace_id == trace_id
    assert api_span.parent_span_id == client_span_id
    assert api_span.kind == SERVER
    assert api_span.name == "POST /v2/{entity}/{project}/scores"
    assert api_span.attributes["http.response.status_code"] == 200
    assert api_span.attributes["score_ingest.request_id"] == response.headers["x-request-id"]

    (store,) = receiver.received(_store)
    # One message's context in the batch: the store span continues its trace, and links it.
    assert store.trace_id == trace_id
    assert store.parent_span_id == api_span.span_id
    assert store.links == [(trace_id, api_span.span_id)]
    assert store.kind == CONSUMER
    assert store.attributes["messaging.destination.name"] == "scores.persist"
    assert store.attributes["messaging.batch.message_count"] == 1
    assert store.attributes["score_ingest.scores"] == 1
    assert store.attributes["score_ingest.links_dropped"] == 0
    (insert,) = receiver.received(lambda span: span.name == "insert")
    assert insert.parent_span_id == store.span_id
    assert insert.trace_id == trace_id
    assert insert.kind == CLIENT
    assert insert.attributes["score_ingest.stored"] == 1


async def test_a_batch_request_carries_its_trace_to_the_message(
    traced: Settings, receiver: OtlpReceiver, api_key: str, persist_queue: AbstractQueue
) -> None:
    traceparent, trace_id, _ = _traceparent()
    async with running_app(traced) as app, client_for(app) as client:
        response = await client.post(
            f"{URL}/batch",
            json={"scores": [score_body(), score_body()]},
            headers={**basic_auth(api_key), "traceparent": traceparent},
        )
        assert response.status_code == 200, response.text
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    (api_span,) = receiver.received(_api)
    assert api_span.trace_id == trace_id
    assert _published_headers(message) == {TRACEPARENT_HEADER: _of(api_span)}


async def test_scores_gathered_into_one_message_carry_each_requests_traceparent(
    traced: Settings, persist_queue: AbstractQueue
) -> None:
    async with running_app(traced) as app:
        publisher = app.state.services.publisher
        traceparents = [_traceparent()[0] for _ in range(5)]

        async def publish_as(traceparent: str) -> None:
            current_traceparent.set(traceparent)
            await publisher.publish_scores([score_message().model_dump(mode="json")])

        # Started in the same turn of the event loop: the publisher gathers them.
        await asyncio.gather(
            *(
                asyncio.create_task(publish_as(each), context=contextvars.copy_context())
                for each in traceparents
            )
        )
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert await persist_queue.get(no_ack=True, fail=False) is None, "not gathered into one"
    assert _published_headers(message) == {TRACEPARENTS_HEADER: traceparents}


@pytest.mark.parametrize(
    "malformed",
    [
        "not a traceparent",
        "00-00000000000000000000000000000000-0123456789abcdef-01",  # zero trace id
        "00-0123456789abcdef0123456789abcdef-0000000000000000-01",  # zero span id
        "ff-0123456789abcdef0123456789abcdef-0123456789abcdef-01",  # version ff
        "00-0123456789ABCDEF0123456789ABCDEF-0123456789abcdef-01",  # upper case
        "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01-extra",  # 00 has four fields
        "00-0123456789abcdef0123456789abcdef-0123456789abcdef",
        "\u00e9" * 55,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace(
    traced: Settings,
    receiver: OtlpReceiver,
    api_key: str,
    persist_queue: AbstractQueue,
    malformed: str,
) -> None:
    async with running_app(traced) as app, client_for(app) as client:
        response = await client.post(
            URL,
            json=score_body(),
            headers=[
                *((name.encode(), value.encode()) for name, value in basic_auth(api_key).items()),
                (b"traceparent", malformed.encode()),
            ],
        )
        assert response.status_code == 200, response.text
    (api_span,) = receiver.received(_api)
    assert api_span.parent_span_id == ""
    assert api_span.trace_id != "0123456789abcdef0123456789abcdef"
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert _published_headers(message) == {TRACEPARENT_HEADER: _of(api_span)}


async def test_a_traceparent_not_sampled_is_followed_and_nothing_is_sent(
    traced: Settings, receiver: OtlpReceiver, api_key: str, persist_queue: AbstractQueue
) -> None:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    async with running_app(traced) as app, client_for(app) as client:
        response = await client.post(
            URL,
            json=score_body(),
            headers={**basic_auth(api_key), "traceparent": f"00-{trace_id}-{span_id}-00"},
        )
        assert response.status_code == 200, response.text
    assert receiver.received(_api) == []
    message = await persist_queue.get(no_ack=True, fail=False)
    assert message is not None
    assert _published_headers(message) == {}


def _otel_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("Otel")}


async def test_without_an_endpoint_there_is_no_tracer_no_thread_and_no_header(
    settings: Settings, api_key: str, persist_queue: AbstractQueue
) -> None:
    assert settings.otel_exporter_otlp_endpoint is None
    before = _otel_threads()
    traceparent, _, _ = _traceparent()
    async with running_app(settings) as app, client_for(app) as client:
        (middleware,) = [
            m for m in app.user_middleware if cast(object, m.cls) is RequestContextMiddleware
        ]
        assert middleware.kwargs == {"tracing": None}
        for path, body in ((URL, score_body()), (f"{URL}/batch", {"scores": [score_body()]})):
            response = await client.post(
                path, json=body, headers={**basic_auth(api_key), "traceparent": traceparent}
            )
            assert response.status_code == 200, response.text
        assert _otel_threads() == before
    for _ in range(2):
        message = await persist_queue.get(no_ack=True, fail=False)
        assert message is not None
        assert _published_headers(message) == {}


async def test_a_traced_app_exports_from_a_thread_stopped_with_it_and_skips_probes(
    traced: Settings, receiver: OtlpReceiver
) -> None:
    before = _otel_threads()
    async with running_app(traced) as app, client_for(app) as client:
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(probe)).status_code == 200
        assert (await client.post(URL, json=score_body())).status_code == 401
        assert _otel_threads() - before
    assert not any(thread.is_alive() for thread in _otel_threads() - before)
    # Probes and scrapes are not traced.
    (span,) = receiver.received(_api)
    assert span.name == "POST /v2/{entity}/{project}/scores"
    assert span.attributes["http.response.status_code"] == 401


def test_log_records_of_a_traced_request_carry_its_trace_id(receiver: OtlpReceiver) -> None:
    tracing = Tracing(receiver.endpoint, "score-ingest-api")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    traceparent, trace_id, _ = _traceparent()
    scope = {
        "type": "http",
        "method": "POST",
        "path": URL,
        "headers": [(b"traceparent", traceparent.encode())],
    }
    try:
        span = RequestSpan(tracing, scope, "request-1")
        logger.warning("inside")
        published = current_traceparent.get()
        span.end(URL, 200)
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        tracing.close()
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == trace_id
    assert "trace_id" not in after
    assert current_traceparent.get() is None
    context = parse_traceparent(published)
    assert context is not None
    assert f"{context.trace_id:032x}" == trace_id
    (exported,) = receiver.received(_api)
    assert exported.span_id == f"{context.span_id:016x}"


async def test_the_client_sees_the_same_answers_with_tracing_on(
    traced: Settings, api_key: str
) -> None:
    async with running_app(traced) as app, client_for(app) as client:
        unauthorized = await client.post(URL, json=score_body(), headers={"traceparent": "x"})
        invalid = await client.post(URL, json={}, headers=basic_auth(api_key))
    assert unauthorized.status_code == 401
    assert invalid.status_code == 422
