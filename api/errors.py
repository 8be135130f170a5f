"""The API's failure kinds, and the one place they become HTTP responses."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette import status
from starlette.requests import Request
from starlette.responses import Response

from shared.db import DATABASE_UNAVAILABLE

if TYPE_CHECKING:  # FastAPI itself is imported when handlers are installed: `cli keys`
    # uses these errors (through api.keys) and starts faster without it.
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

WWW_AUTHENTICATE = 'Basic realm="score-ingest", Bearer realm="score-ingest"'


class ApiError(Exception):
    """A failure with an HTTP status and a message safe to show the client."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}

    def content(self) -> Any:
        """The JSON body."""
        return {"detail": self.detail}


class InvalidCredentials(ApiError):
    """No key, or a key that is malformed, unknown or revoked."""

    status_code = status.HTTP_401_UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        """Tell the client which schemes we take."""
        return {"WWW-Authenticate": WWW_AUTHENTICATE}


class Forbidden(ApiError):
    """A valid key, but for another entity or project."""

    status_code = status.HTTP_403_FORBIDDEN


class NotFound(ApiError):
    """No such score in this project."""

    status_code = status.HTTP_404_NOT_FOUND


class IdempotencyKeyReused(ApiError):
    """The Idempotency-Key was first used with a different request body."""

    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT

    def content(self) -> Any:
        """Shaped like any other validation error, pointing at the header."""
        return {
            "detail": [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": self.detail,
                    "type": "idempotency_key_reused",
                }
            ]
        }


class QuotaExceeded(ApiError):
    """Over a key's or an entity's quota (api/quotas.py): retry after Retry-After."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS

    def __init__(self, detail: str, retry_after: int, rate_limit: dict[str, str]) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.rate_limit = rate_limit

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds, and the RateLimit-Policy and RateLimit fields."""
        return {"Retry-After": str(self.retry_after), **self.rate_limit}


class BatchOverQuota(ApiError):
    """More scores in one request than a quota's burst: no wait lets it pass, so a 413."""

    status_code = status.HTTP_413_CONTENT_TOO_LARGE

    def __init__(self, detail: str, rate_limit: dict[str, str]) -> None:
        super().__init__(detail)
        self.rate_limit = rate_limit

    def headers(self) -> dict[str, str]:
        """The RateLimit-Policy field, which says the burst."""
        return dict(self.rate_limit)


class ServiceUnavailable(ApiError):
    """We cannot do it right now; the client should retry after Retry-After."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class AuthBackendUnavailable(ServiceUnavailable):
    """The key is not cached and the database that knows it is unreachable."""


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL cannot be reached for a read, a delete or an Idempotency-Key."""


class BrokerUnavailable(ServiceUnavailable):
    """The broker did not confirm the score: unreachable, refused, or too slow."""


@contextmanager
def database_unavailable_as_503() -> Iterator[None]:
    """Turn a lost or refused database connection, no free connection within its wait, or a
    statement over its time into DatabaseUnavailable."""
    try:
        yield
    except DATABASE_UNAVAILABLE as exc:
        raise DatabaseUnavailable("database unavailable or busy, retry later") from exc


def _json(content: Any, status_code: int, headers: dict[str, str] | None = None) -> Response:
    # ASCII-escaped JSON can carry anything a message holds, lone surrogates included.
    return Response(
        json.dumps(content), status_code=status_code, headers=headers, media_type="application/json"
    )


def _message(error: Any) -> str:
    reason = error.get("ctx", {}).get("error") if error["type"] == "json_invalid" else None
    return f"{error['msg']}: {reason}" if reason else str(error["msg"])


def error_response(exc: ApiError, retry_after_seconds: int) -> Response:
    """The response to an ApiError; 503s carry Retry-After."""
    headers = exc.headers()
    if isinstance(exc, ServiceUnavailable):
        headers["Retry-After"] = str(retry_after_seconds)
    return _json(exc.content(), exc.status_code, headers)


def validation_error_response(exc: "RequestValidationError") -> Response:
    """The 422 of a RequestValidationError: FastAPI's shape, without its `input`.

    FastAPI's default handler echoes the offending input, which may itself be what JSON
    cannot encode (NaN); loc, msg and type say all that is needed.
    """
    detail = [
        {"loc": list(error["loc"]), "msg": _message(error), "type": error["type"]}
        for error in exc.errors()
    ]
    return _json({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)


def install_error_handlers(app: "FastAPI", retry_after_seconds: int) -> None:
    """Map ApiError subclasses and validation errors to JSON responses."""
    from fastapi.exceptions import RequestValidationError

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, retry_after_seconds)

    async def validation_failed(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_failed)
