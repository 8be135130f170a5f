"""The hot path: a plain, valid `POST /v2/{entity}/{project}/scores`, answered directly.

FastAPI spends more per request on routing, dependency solving and response validation than
score-ingest spends on authenticating and publishing (BENCHMARKS.md). This layer answers the
common case itself, with the same functions the route uses: the path checked with the
contract's types, the key parsed as `HTTPBasic`/`HTTPBearer` parse it and verified by the
same `KeyVerifier`, the body decoded and validated as FastAPI does it, and the score
published by `service.create_scores`.

Every other request goes on to the app with its body replayed: anything not POST to that
path, an Idempotency-Key, a content type that is not JSON, no key or a malformed header, a
path or body that does not validate. So every validation error is FastAPI's own. A key that
fails, a key of another project and an unconfirmed publish raise the same ApiError as in the
route, answered by the same `error_response`. The tests send each case both ways and compare.
"""

import binascii
from base64 import b64decode

from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter
from pydantic_core import from_json, to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import service
from api.deps import Services, project_scope
from api.errors import ApiError, error_response
from api.limits import replay
from api.routes import scores
from api.schemas import ScoreCreateBody
from shared.contract import EntityName, ProjectName

_ENTITY: TypeAdapter[str] = TypeAdapter(EntityName)
_PROJECT: TypeAdapter[str] = TypeAdapter(ProjectName)
_BODY = TypeAdapter(ScoreCreateBody)


class ScoreCreateFastPath:
    """Answer plain score creations; hand everything else to the app, unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # What the router puts in the scope: the metrics label requests by its path.
        self._route = next(
            route
            for route in scores.router.routes
            if isinstance(route, APIRoute)
            and route.path == scores.CREATE_PATH
            and route.methods == {"POST"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Take the request if it is a plain score creation, else pass it on."""
        names = _create_path(scope)
        if names is None:
            await self.app(scope, receive, send)
            return
        messages = await _read_body(receive)
        plain = _plain_create(scope, names, messages)
        if plain is None:
            await self.app(scope, replay(messages, receive), send)
            return
        key, body = plain
        entity, project = names
        services: Services = scope["app"].state.services
        scope["route"] = self._route
        try:
            (score_id,) = await service.create_scores(
                await project_scope(services, entity, project, key),
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


def _create_path(scope: Scope) -> tuple[str, str] | None:
    """(entity, project) of a POST to the create path, else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    parts = scope["path"].split("/")
    # ["", "v2", entity, project, "scores"]: the router's {param} is one non-empty segment.
    if len(parts) != 5 or parts[0] or parts[1] != "v2" or parts[4] != "scores":
        return None
    if not parts[2] or not parts[3]:
        return None
    return parts[2], parts[3]


async def _read_body(receive: Receive) -> list[Message]:
    """Every message of the request body (BodySizeLimitMiddleware has bounded it)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _plain_create(
    scope: Scope, names: tuple[str, str], messages: list[Message]
) -> tuple[str, ScoreCreateBody] | None:
    """The API key and the validated body of a plain creation; None for anything else."""
    if messages[-1]["type"] != "http.request":
        return None
    authorization = content_type = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == b"idempotency-key":
            return None
    # No content type is not JSON either: FastAPI (strict_content_type) does not read it.
    if content_type is None or content_type.partition(";")[0].strip().lower() != (
        "application/json"
    ):
        return None
    key = _api_key(authorization)
    if key is None:
        return None
    try:
        _ENTITY.validate_python(names[0])
        _PROJECT.validate_python(names[1])
        decoded = from_json(b"".join(message.get("body", b"") for message in messages))
        body = _BODY.validate_python(decoded, from_attributes=True)
    except ValueError:  # ValidationError too
        return None
    return key, body


def _api_key(authorization: str | None) -> str | None:
    """The key of a well-formed Basic or Bearer header, read as HTTPBasic and HTTPBearer do."""
    scheme, param = get_authorization_scheme_param(authorization)
    if not authorization or not scheme:
        return None
    if scheme.lower() == "basic":
        try:
            data = b64decode(param).decode("ascii")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            return None
        _, separator, password = data.partition(":")
        return password if separator else None
    if scheme.lower() == "bearer" and param:
        return param
    return None
