"""HTTP endpoints of the scores resource."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from starlette.types import Message, Send

from api import service
from api.deps import ProjectScopeDep
from api.json_route import WriteRoute
from api.schemas import (
    DEFAULT_LIST_LIMIT,
    MAX_DELETE_IDS,
    MAX_LIST_LIMIT,
    MAX_LIST_OFFSET,
    ErrorRes,
    ScoreBatchCreateBody,
    ScoreBatchCreateRes,
    ScoreCreateBody,
    ScoreCreateRes,
    ScoreDeleteRes,
    ScoreReadRes,
)
from shared.contract import Identifier

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorRes, "description": "Missing, malformed, unknown or revoked API key"},
    403: {"model": ErrorRes, "description": "The API key is not scoped to this entity/project"},
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorRes, "description": "Unavailable right now; retry after Retry-After"},
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    413: {"model": ErrorRes, "description": "Request body larger than the limit"},
    429: {
        "model": ErrorRes,
        "description": (
            "Not accepted: over the key's or the entity's quota of scores per second; retry "
            "after Retry-After (RateLimit-Policy and RateLimit say the quota). A batch larger "
            "than the quota's burst is a 413: split it"
        ),
    },
    503: {
        "model": ErrorRes,
        "description": "Not accepted: the broker (or key store) is unavailable; see Retry-After",
    },
}

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description=(
            "Makes retries safe: the same key in the same project always gets the same "
            "score ids and at most one row each. Remembered for IDEMPOTENCY_KEY_TTL_SECONDS "
            "(default 24 h); reusing it with a different body is a 422."
        ),
    ),
]

CREATE_PATH = "/v2/{entity}/{project}/scores"

log = logging.getLogger(__name__)

router = APIRouter(tags=["Scores"])
# The writes, served by WriteRoute after RequestGate's checks (api/json_route.py). The app
# puts them on its own router, not through include_router (api/app.py).
writes = APIRouter(tags=["Scores"], route_class=WriteRoute)


class _JsonLinesStream(StreamingResponse):
    """A JSON Lines stream, cut when its client takes no chunk within send_timeout.

    The server writes a chunk once the client has taken most of the one before (the ASGI
    server's flow control); a client that stops reading would otherwise hold the request,
    its chunk and its socket for as long as it likes. A cut stream ends without its last
    chunk and the server closes the connection, so the client sees a truncated body,
    never one that looks complete.
    """

    def __init__(self, chunks: AsyncIterator[bytes], send_timeout: float) -> None:
        super().__init__(chunks, media_type="application/jsonl")
        self._send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        """Send the headers and every chunk, each within send_timeout, then the end."""
        start: Message = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        if not await self._send_in_time(send, start):
            return
        async for chunk in self.body_iterator:
            body = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode()
            message: Message = {"type": "http.response.body", "body": body, "more_body": True}
            if not await self._send_in_time(send, message):
                return
        await self._send_in_time(
            send, {"type": "http.response.body", "body": b"", "more_body": False}
        )

    async def _send_in_time(self, send: Send, message: Message) -> bool:
        try:
            async with asyncio.timeout(self._send_timeout):
                await send(message)
        except TimeoutError:
            log.warning("list stream cut: the client took no data for %s s", self._send_timeout)
            return False
        return True


@writes.post(
    CREATE_PATH,
    summary="Create a score",
    description="Creates a score. A 200 means the broker has durably accepted it.",
    responses=_WRITE_ERRORS,
)
async def score_create(
    scope: ProjectScopeDep,
    body: ScoreCreateBody,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ScoreCreateRes:
    """Create one score."""
    (score_id,) = await service.create_scores(
        scope,
        [body],
        kind="single",
        idempotency_key=idempotency_key,
        idempotency_ttl_seconds=scope.services.settings.idempotency_key_ttl_seconds,
    )
    return ScoreCreateRes(score_id=str(score_id))


@writes.post(
    "/v2/{entity}/{project}/scores/batch",
    summary="Create scores in a batch",
    description=(
        "Creates up to 1000 scores (body at most MAX_BATCH_BODY_BYTES, default 16 MiB). "
        "All are validated first: one invalid item fails the whole request with a 422 "
        "whose loc names it. A 200 means the broker has durably accepted every one."
    ),
    responses=_WRITE_ERRORS,
)
async def score_batch_create(
    scope: ProjectScopeDep,
    body: ScoreBatchCreateBody,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ScoreBatchCreateRes:
    """Create many scores at once."""
    score_ids = await service.create_scores(
        scope,
        body.scores,
        kind="batch",
        idempotency_key=idempotency_key,
        idempotency_ttl_seconds=scope.services.settings.idempotency_key_ttl_seconds,
    )
    return ScoreBatchCreateRes(score_ids=[str(score_id) for score_id in score_ids])


@router.get(
    "/v2/{entity}/{project}/scores/{score_id}",
    summary="Read a score",
    description="Reads a stored score. Scores become readable once the worker stored them.",
    response_model=ScoreReadRes,
    responses={
        **_AUTH_ERRORS,
        404: {"model": ErrorRes, "description": "No such score"},
        **_UNAVAILABLE,
    },
)
async def score_read(scope: ProjectScopeDep, score_id: UUID) -> Response:
    """Read one score."""
    return Response(await service.read_score(scope, score_id), media_type="application/json")


@router.get(
    "/v2/{entity}/{project}/scores",
    summary="List scores",
    description=(
        "Streams the project's stored scores as JSON Lines (one ScoreReadRes per line) in "
        "creation order (score_id order). Page with `limit` and `after` (the last score_id "
        f"of the page before); `offset` skips at most {MAX_LIST_OFFSET} scores. A client "
        "that takes no data for LIST_SEND_TIMEOUT_SECONDS (default 10 s) has its stream "
        "cut: the body ends without its last lines."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One ScoreReadRes per line",
            "content": {
                "application/jsonl": {"schema": {"$ref": "#/components/schemas/ScoreReadRes"}}
            },
        },
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
    },
)
async def score_list(
    scope: ProjectScopeDep,
    evaluation_run_id: Annotated[
        Identifier | None, Query(description="Only scores of this evaluation run")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIST_LIMIT, description="Most scores to return")
    ] = DEFAULT_LIST_LIMIT,
    offset: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_LIST_OFFSET,
            description=f"Scores to skip, at most {MAX_LIST_OFFSET}; page deeper with `after`",
        ),
    ] = 0,
    after: Annotated[
        UUID | None,
        Query(
            description=(
                "Only scores after this score_id (keyset paging: pass the last score_id of "
                "the page before); `offset` then skips from there"
            )
        ),
    ] = None,
) -> StreamingResponse:
    """List scores."""
    chunks = await service.list_scores(scope, evaluation_run_id, limit, offset, after)
    return _JsonLinesStream(chunks, scope.services.settings.list_send_timeout_seconds)


@router.delete(
    "/v2/{entity}/{project}/scores",
    summary="Delete scores",
    description=(
        "Deletes scores for good: a deleted score never comes back, not even when its "
        "message is still queued, redelivered or replayed."
    ),
    responses={**_AUTH_ERRORS, **_UNAVAILABLE},
)
async def score_delete(
    scope: ProjectScopeDep,
    score_ids: Annotated[
        list[UUID],
        Query(min_length=1, max_length=MAX_DELETE_IDS, description="Score IDs to delete"),
    ],
) -> ScoreDeleteRes:
    """Delete scores."""
    return ScoreDeleteRes(num_deleted=await service.delete_scores(scope, score_ids))
