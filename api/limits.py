"""Request body size limit, enforced while the body is read, before any parsing."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimitMiddleware:
    """Answer 413 to any request whose body exceeds its limit, declared or streamed.

    Batch requests (paths ending in /batch) get their own, larger limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_batch_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_batch_bytes = max_batch_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a declared length over the limit at once; count a chunked body as it comes,
        then hand it on as one message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_batch_bytes if scope["path"].endswith("/batch") else self.max_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await _too_large(send, limit)
                return
            # The server reads exactly the declared length, never more: nothing to count.
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay([body], receive), send)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (name in lower case), as the server passed it."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {"detail": f"request body is larger than the limit of {limit} bytes"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives these messages first, then the rest of the request."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
