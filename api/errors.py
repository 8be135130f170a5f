"""The API's failure kinds, and the one place they become HTTP responses."""

import json

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

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


class InvalidCredentials(ApiError):
    """No key, or a key that is malformed, unknown or revoked."""

    status_code = status.HTTP_401_UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        """Tell the client which schemes we take."""
        return {"WWW-Authenticate": WWW_AUTHENTICATE}


class Forbidden(ApiError):
    """A valid key, but for another entity or project."""

    status_code = status.HTTP_403_FORBIDDEN


class ServiceUnavailable(ApiError):
    """We cannot promise durability right now; the client should retry."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class AuthBackendUnavailable(ServiceUnavailable):
    """The key is not cached and the database that knows it is unreachable."""


class BrokerUnavailable(ServiceUnavailable):
    """The broker did not confirm the score: unreachable, refused, or too slow."""


def install_error_handlers(app: FastAPI, retry_after_seconds: int) -> None:
    """Map ApiError subclasses to JSON responses `{"detail": ...}`; 503s carry Retry-After."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        headers = exc.headers()
        if isinstance(exc, ServiceUnavailable):
            headers["Retry-After"] = str(retry_after_seconds)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(ApiError, handle)
    app.add_exception_handler(RequestValidationError, _validation_failed)


async def _validation_failed(_: Request, exc: Exception) -> Response:
    # FastAPI's default handler echoes the offending input, which may itself be what JSON
    # cannot encode (NaN, lone surrogates); loc, msg and type say all that is needed, and
    # ASCII-escaped JSON can carry any of them.
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    return Response(
        json.dumps({"detail": detail}),
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        media_type="application/json",
    )
