"""The request body size limit, and helpers to read a request's headers and body."""

from starlette import status
from starlette.types import Receive, Scope

from api.errors import ApiError


class BodyTooLarge(ApiError):
    """The body is larger than its limit, as declared or as it arrived."""

    status_code = status.HTTP_413_CONTENT_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")

    def headers(self) -> dict[str, str]:
        """The rest of the body is not read: the connection cannot carry another request."""
        return {"Connection": "close"}


class ClientGone(Exception):
    """The client disconnected before its body arrived whole (or the server cut it off)."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request's whole body, read only while it stays within limit; raises BodyTooLarge
    (a declared length over the limit is refused unread) or ClientGone."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (name in lower case), as the server passed it."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
