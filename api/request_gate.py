"""What a request must pass before the api reads its body.

An entity or project in a path whose percent-escapes do not decode as UTF-8 is refused
(422, loc `["path", "entity"]` or `["path", "project"]`, type `string_unicode`): the server
would decode them to U+FFFD, so that two different paths would name one project.

A write (`POST …/scores`, `POST …/scores/batch`) is checked before a byte of its body is
read, in the order the routes check it: the names (the same 422 the route gives), the key
(401, 403, or 503 when it cannot be verified now), the charset (415: bodies are read as
UTF-8 only), the declared length (413). Only then is its body read, whole and up to its
limit (413 past it), and handed with the key's project scope to the write's route
(api/json_route.py, CheckedWrite), which answers it. So a client without a valid key costs a
key check, never a body: what it sends after its headers is not read, and the server closes
the connection after the answer (api/http_server.py).

Everything else goes on untouched: no other route reads a body.
"""

import binascii
from base64 import b64decode
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from fastapi import status
from fastapi.exceptions import RequestValidationError
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import ProjectScope, Services, project_scope
from api.errors import (
    ApiError,
    InvalidCredentials,
    error_response,
    validation_error_response,
)
from api.json_route import CHECKED_WRITE, CheckedWrite, WriteRoute
from api.limits import ClientGone, read_body
from api.routes import scores
from shared.contract import EntityName, ProjectName

_NAMES: tuple[tuple[str, TypeAdapter[str]], ...] = (
    ("entity", TypeAdapter(EntityName)),
    ("project", TypeAdapter(ProjectName)),
)
# pydantic's own words for bytes that are not UTF-8.
_NOT_UTF8 = "Input should be a valid string, unable to parse raw data as a unicode string"
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})

Write = Literal["single", "batch"]
_WRITE_PATHS: tuple[tuple[Write, str], ...] = (
    ("single", scores.CREATE_PATH),
    ("batch", f"{scores.CREATE_PATH}/batch"),
)


class InvalidPath(ApiError):
    """Names in the path that no route would take: a validation error, as FastAPI's."""

    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid path")
        self.errors = errors

    def content(self) -> Any:
        """Shaped like every other validation error."""
        return {"detail": self.errors}


class UnsupportedCharset(ApiError):
    """A body declared in a charset other than UTF-8 (or its subset US-ASCII)."""

    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE


class RequestGate:
    """Refuse what can be refused before reading a body; read a write's body within its
    limit and hand it to its route; hand everything else on untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_batch_bytes: int) -> None:
        self.app = app
        self._limits: dict[Write, int] = {"single": max_bytes, "batch": max_batch_bytes}
        # What the router puts in the scope: the metrics label requests by its path.
        self._routes: dict[Write, WriteRoute] = {
            kind: next(
                route
                for route in scores.writes.routes
                if isinstance(route, WriteRoute) and route.path == path
            )
            for kind, path in _WRITE_PATHS
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request; answer it if it fails, else pass it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts = _route_path(scope).split("/")
        if len(parts) < 4 or parts[0] or parts[1] != "v2":
            await self.app(scope, receive, send)
            return
        kind = _write(scope["method"], parts)
        services: Services = scope["app"].state.services
        try:
            if kind is None:
                undecodable = _undecodable_names(scope)
                if undecodable:
                    raise InvalidPath(undecodable)
                await self.app(scope, receive, send)
                return
            route = scope["route"] = self._routes[kind]
            authorized = await _check_write(scope, services, parts[2], parts[3])
            body = await read_body(scope, receive, self._limits[kind])
            scope[CHECKED_WRITE] = CheckedWrite(authorized, body)
            # Straight to the write's route, which the router would only find again, through
            # ExceptionMiddleware and the routes before it: a tenth of the api's CPU for a
            # single POST (BENCHMARKS.md). Its errors, raised before it answers, are answered
            # as the app's handlers answer them (api/errors.py).
            await route.handle(scope, receive, send)
        except ApiError as exc:
            # Unless its body had arrived, the server closes the connection after this.
            await error_response(exc, services.settings.retry_after_seconds)(scope, receive, send)
        except RequestValidationError as exc:
            await validation_error_response(exc)(scope, receive, send)
        except ClientGone:
            return


def api_key(authorization: str | None) -> str:
    """The key in an Authorization header, read as the routes read it (HTTP Basic's
    password, else a Bearer token); raises the same InvalidCredentials they raise."""
    scheme, param = get_authorization_scheme_param(authorization)
    if authorization and scheme.lower() == "basic":
        try:
            data = b64decode(param).decode("ascii")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise InvalidCredentials("malformed HTTP Basic credentials") from None
        _, separator, password = data.partition(":")
        if not separator:
            raise InvalidCredentials("malformed HTTP Basic credentials")
        return password
    if authorization and scheme and param and scheme.lower() == "bearer":
        return param
    raise InvalidCredentials("missing API key: use HTTP Basic (password) or Bearer")


def _route_path(scope: Scope) -> str:
    """The path the router matches: the request's, without the root path it was mounted at."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _write(method: str, parts: list[str]) -> Write | None:
    """Which write a request is (parts: its path split at /), if it is one."""
    if method != "POST" or not parts[2] or not parts[3] or parts[4:5] != ["scores"]:
        return None
    if len(parts) == 5:
        return "single"
    if len(parts) == 6 and parts[5] == "batch":
        return "batch"
    return None


async def _check_write(scope: Scope, services: Services, entity: str, project: str) -> ProjectScope:
    """Everything a write is checked for before its body: names, key, charset."""
    errors = _undecodable_names(scope)
    undecodable = {error["loc"][1] for error in errors}
    for (name, adapter), value in zip(_NAMES, (entity, project), strict=True):
        if name in undecodable:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            errors += [
                {"loc": ["path", name, *error["loc"]], "msg": error["msg"], "type": error["type"]}
                for error in exc.errors()
            ]
    if errors:
        raise InvalidPath(errors)
    authorization = content_type = None
    for header_name, value in scope["headers"]:
        if header_name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif header_name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
    authorized = await project_scope(services, entity, project, api_key(authorization))
    charset = _foreign_charset(content_type)
    if charset is not None:
        raise UnsupportedCharset(f"charset {charset!r} is not supported: send UTF-8")
    return authorized


def _undecodable_names(scope: Scope) -> list[dict[str, Any]]:
    """Errors for the entity and project segments whose percent-escapes are not UTF-8."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None or b"%" not in raw:
        return []
    root = scope.get("root_path", "").encode()
    if root and raw.startswith(root):
        raw = raw[len(root) :]
    # Split after decoding, as the router splits the decoded path.
    segments = unquote_to_bytes(raw).split(b"/")
    return [
        {"loc": ["path", name], "msg": _NOT_UTF8, "type": "string_unicode"}
        for index, (name, _) in enumerate(_NAMES, start=2)
        if index < len(segments) and not _is_utf8(segments[index])
    ]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _foreign_charset(content_type: str | None) -> str | None:
    """A charset parameter of a Content-Type that is not UTF-8 (or US-ASCII), if any."""
    if content_type is None or ";" not in content_type:
        return None
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in _UTF8_CHARSETS:
            return charset
    return None
