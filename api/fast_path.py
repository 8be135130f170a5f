"""The hot path: a plain, valid `POST /v2/{entity}/{project}/scores`, answered directly.

FastAPI spends more per request on routing, dependency solving and response validation than
score-ingest spends on authenticating and publishing (BENCHMARKS.md). This layer answers the
common case itself, with the same functions the route uses: the path and key were checked,
before the body was read, by `RequestGate` (which answered any failure), the body is
decoded and validated as FastAPI does it, and the score is published by
`service.create_scores`.

Every other request goes on to the app with its body replayed: anything not POST to that
path, an Idempotency-Key, a content type that is not JSON, a body that does not validate.
So every validation error is FastAPI's own. An unconfirmed publish raises the same ApiError
as in the route, answered by the same `error_response`. The tests send each case both ways
and compare.
"""

from pydantic import TypeAdapter
from pydantic_core import from_json, to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import service
from api.errors import ApiError, error_response
from api.limits import replay
from api.request_gate import authorized_create
from api.schemas import ScoreCreateBody

_BODY = TypeAdapter(ScoreCreateBody)


class ScoreCreateFastPath:
    """Answer plain score creations; hand everything else to the app, unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Take the request if it is a plain score creation, else pass it on."""
        authorized = authorized_create(scope)
        if authorized is None:
            await self.app(scope, receive, send)
            return
        messages = await _read_body(receive)
        body = _plain_create(scope, messages)
        if body is None:
            await self.app(scope, replay(messages, receive), send)
            return
        services = authorized.services
        try:
            (score_id,) = await service.create_scores(
                authorized,
                [body],
                kind="single",
                idempotency_key=None,
                idempotency_ttl_seconds=services.settings.idempotency_key_ttl_seconds,
            )
        except ApiError as exc:
            # The same failure the route's dependency or body raises, answered the same way.
            await error_response(exc, services.settings.retry_after_seconds)(scope, receive, send)
            return
        content = to_json({"score_id": str(score_id)})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Receive) -> list[Message]:
    """Every message of the request body (RequestGate has read and bounded it)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _plain_create(scope: Scope, messages: list[Message]) -> ScoreCreateBody | None:
    """The validated body of a plain creation; None for anything else."""
    if messages[-1]["type"] != "http.request":
        return None
    content_type = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == b"idempotency-key":
            return None
    # No content type is not JSON either: FastAPI (strict_content_type) does not read it.
    if content_type is None or content_type.partition(";")[0].strip().lower() != (
        "application/json"
    ):
        return None
    try:
        decoded = from_json(b"".join(message.get("body", b"") for message in messages))
        return _BODY.validate_python(decoded, from_attributes=True)
    except ValueError:  # ValidationError too
        return None
