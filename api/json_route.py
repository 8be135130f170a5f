"""Request bodies decoded by pydantic's JSON parser, the same one the worker uses.

Python's json module turns some bad bodies into 400s (integers over 4300 digits, deep
nesting, invalid UTF-8) and lets others through that JSON does not allow (NaN). Decoding
with pydantic_core on both sides means the API and the worker agree on what a body says,
and every decode failure becomes a 422 that says why.
"""

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json


class _PydanticJsonRequest(Request):
    async def json(self) -> Any:
        """The body decoded by pydantic_core; failures raise JSONDecodeError, which is a 422."""
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = from_json(body)
            except ValueError as exc:
                text = body.decode(errors="replace")
                raise json.JSONDecodeError(str(exc), text, _offset(text, str(exc))) from None
        return self._json


_POSITION = re.compile(r"at line (\d+) column (\d+)")


def _offset(text: str, message: str) -> int:
    """The character offset that a pydantic_core message's "at line L column C" points to."""
    match = _POSITION.search(message)
    if match is None:
        return 0
    line, column = int(match.group(1)), int(match.group(2))
    lines = text.split("\n")
    return sum(len(previous) + 1 for previous in lines[: line - 1]) + column - 1


class PydanticJsonRoute(APIRoute):
    """An APIRoute whose JSON bodies are decoded by pydantic_core."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so it sees our Request."""
        handler = super().get_route_handler()

        async def decode_with_pydantic(request: Request) -> Response:
            return await handler(_PydanticJsonRequest(request.scope, request.receive))

        return decode_with_pydantic
