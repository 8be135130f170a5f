"""The write routes: a score or a batch POSTed as JSON, served without FastAPI's request handler.

A write is checked before its body is read, by RequestGate (api/request_gate.py): the names
in its path, its key, its charset, its size. The gate leaves a CheckedWrite in the request's
scope, the project scope the key was verified for and the body it read, and hands the
request to its WriteRoute, which does the rest as FastAPI's request handler would:

- the body is read as JSON when its content type is `application/json` or `application/*+json`
  (FastAPI's rule, with strict content types, its default); any other body is validated as it
  is, bytes, and fails; an empty body is missing;
- JSON is decoded by pydantic's parser, the one the worker uses: Python's json module turns
  some bad bodies into 400s (integers over 4300 digits, deep nesting, invalid UTF-8) and lets
  others through that JSON does not allow (NaN), so the api and the worker would disagree;
- the Idempotency-Key header and the body are validated against the endpoint's own
  declaration, and every failure is a RequestValidationError with FastAPI's loc, msg and type,
  which the app's handler answers (api/errors.py) like any other 422;
- the endpoint is called with the project scope, the body and the header, and its result is
  answered as JSON with a 200, or, when the endpoint returns a Response (a create that asked
  for its stored representation, `Prefer: return=representation`), as that Response.

FastAPI's request handler would verify the key again (the route's dependencies), validate
the result against the response model and go through its dependency machinery: on the bench
machine a single POST cost twice the api's CPU that way (BENCHMARKS.md). FastAPI still
documents a WriteRoute from its declaration, so the OpenAPI document is FastAPI's own, and
the router matches it as any route (a method other than POST gets FastAPI's 405). The
endpoint must take exactly what a WriteRoute supplies (ProjectScopeDep, one body, headers):
anything else added to a write, a dependency or a query parameter, fails when the route is
made instead of being silently skipped.
"""

import re
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json, to_json
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.deps import ProjectScope, authorize_project

# Where RequestGate leaves the CheckedWrite of a write it let through.
CHECKED_WRITE = "score_ingest.checked_write"


class CheckedWrite(NamedTuple):
    """A write RequestGate let through: the project scope its key may write to, and its body."""

    project: ProjectScope
    body: bytes


class _Missing:
    """An empty body: FastAPI does not read one, so a required body is missing."""


_MISSING = _Missing()
_JSON = b"application/json"


class WriteRoute(APIRoute):
    """A POST of one JSON body that RequestGate checked first; see the module's docstring."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        dependant = self.dependant
        dependencies, bodies = dependant.dependencies, dependant.body_params
        scope = dependencies[0] if len(dependencies) == 1 else None
        body = bodies[0] if len(bodies) == 1 else None
        if (
            scope is None
            or scope.call is not authorize_project
            or scope.name is None
            or dependant.path_params
            or dependant.query_params
            or dependant.cookie_params
            or body is None
            or body.field_info.annotation is None
        ):
            raise TypeError(
                f"{self.name}: a WriteRoute calls its endpoint with a ProjectScopeDep, one body "
                "and headers; it would never resolve anything else"
            )
        self._scope_name = scope.name
        self._body_name = body.name
        self._body: TypeAdapter[Any] = TypeAdapter(body.field_info.annotation)
        # Header parameters by their name on the wire, as the server passes it (lower case).
        self._headers = {
            field.alias.lower().encode("latin-1"): (field.name, field.alias, _adapter(field))
            for field in dependant.header_params
        }

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a POST as the module's docstring says; any other method is refused as
        FastAPI refuses it (405)."""
        if self.methods and scope["method"] not in self.methods:
            await super().handle(scope, receive, send)
            return
        checked: CheckedWrite | None = scope.get(CHECKED_WRITE)
        if checked is None:
            raise RuntimeError(f"{scope['path']}: a write RequestGate did not check")
        arguments = self._arguments(scope, checked.body)
        arguments[self._scope_name] = checked.project
        result = await self.endpoint(**arguments)
        if isinstance(result, Response):
            await result(scope, receive, send)
            return
        content = to_json(result)
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code or 200,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    def _arguments(self, scope: Scope, body: bytes) -> dict[str, Any]:
        """The endpoint's header and body arguments; raises RequestValidationError with every
        error, the headers' first, as FastAPI does (a body that is not JSON at all first and
        alone, as FastAPI decodes it before it validates anything)."""
        content_type = None
        given: dict[bytes, bytes] = {}  # the first value of each header parameter sent
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value if content_type is None else content_type
            elif key in self._headers and key not in given:
                given[key] = value
        value = _decode(content_type, body)
        arguments: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for key, (name, alias, adapter) in self._headers.items():
            if key not in given:
                continue  # the parameter's default
            try:
                arguments[name] = adapter.validate_python(given[key].decode("latin-1"))
            except ValidationError as exc:
                errors += _located(("header", alias), exc)
        if isinstance(value, _Missing):
            errors.append({"type": "missing", "loc": ("body",), "msg": "Field required"})
        else:
            try:
                arguments[self._body_name] = self._body.validate_python(value, from_attributes=True)
            except ValidationError as exc:
                errors += _located(("body",), exc)
        if errors:
            raise RequestValidationError(errors)
        return arguments


def _adapter(field: Any) -> TypeAdapter[Any]:
    """A validator of a parameter's type with its declared constraints."""
    return TypeAdapter(Annotated[field.field_info.annotation, field.field_info])


def _located(prefix: tuple[str, ...], exc: ValidationError) -> list[dict[str, Any]]:
    return [{**error, "loc": (*prefix, *error["loc"])} for error in exc.errors(include_url=False)]


def _decode(content_type: bytes | None, body: bytes) -> Any:
    """The body as FastAPI hands it to validation: decoded JSON, the bytes of a body that is
    not JSON, or _MISSING; raises RequestValidationError for a JSON body that does not decode."""
    if not body:
        return _MISSING
    if content_type != _JSON and not (content_type and _is_json(content_type.decode("latin-1"))):
        return body
    try:
        return from_json(body)
    except ValueError as exc:
        text = body.decode(errors="replace")
        error = {
            "type": "json_invalid",
            "loc": ("body", _offset(text, str(exc))),
            "msg": "JSON decode error",
            "ctx": {"error": str(exc)},
        }
        raise RequestValidationError([error]) from None


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON, read as FastAPI reads it (with email.message: the
    type before any `;`, stripped and in lower case; one that is not type/subtype is
    text/plain)."""
    media_type = content_type.partition(";")[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return (
        media_type.count("/") == 1
        and main == "application"
        and (sub == "json" or sub.endswith("+json"))
    )


_POSITION = re.compile(r"at line (\d+) column (\d+)")


def _offset(text: str, message: str) -> int:
    """The character offset that a pydantic_core message's "at line L column C" points to,
    as json.JSONDecodeError would give it."""
    match = _POSITION.search(message)
    if match is None:
        return 0
    line, column = int(match.group(1)), int(match.group(2))
    lines = text.split("\n")
    return sum(len(previous) + 1 for previous in lines[: line - 1]) + column - 1
