"""HTTP endpoints of the scores resource."""

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, NamedTuple
from uuid import UUID

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from pydantic_core import to_json
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
    ScoreStatusRes,
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

PreferHeader = Annotated[
    str | None,
    Header(
        alias="Prefer",
        description=(
            "`return=representation` (RFC 7240), optionally with `wait=<seconds>`: answer only "
            "once the scores are stored, 201 with their stored representation (as GET answers "
            "it) and `Preference-Applied: return=representation`; or, if they are not stored "
            "within the wait (READ_WAIT_SECONDS by default, at most READ_WAIT_MAX_SECONDS), "
            "202 with their ids: accepted, as a 200 is, but not known to be stored yet. Other "
            "preferences are ignored; without it nothing changes."
        ),
    ),
]
MAX_UNTIL_IDS = 100
MILLISECONDS = 1000
WaitMilliseconds = Annotated[
    int | None,
    Query(
        ge=0,
        description=(
            "How long to wait, in milliseconds, for a score created within the last "
            "READ_WAIT_RECENT_SECONDS that is not stored yet: READ_WAIT_SECONDS by default, "
            "0 for no wait, at most READ_WAIT_MAX_SECONDS"
        ),
    ),
]
PREFERENCE_APPLIED = {"Preference-Applied": "return=representation"}
_PREFERENCE_APPLIED_HEADER = {
    "Preference-Applied": {
        "description": "`return=representation`: the body is the stored representation",
        "schema": {"type": "string"},
    }
}
_ACCEPTED_NOT_STORED = (
    "With `Prefer: return=representation`: accepted (the broker confirmed it, as a 200 says) "
    "but not stored within the wait; read it later, or ask GET …/scores/{score_id}/status"
)

CREATE_PATH = "/v2/{entity}/{project}/scores"

log = logging.getLogger(__name__)

router = APIRouter(tags=["Scores"])
# The writes: RequestGate checks a POST and hands it to its WriteRoute (api/json_route.py).
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


class Preferences(NamedTuple):
    """What a Prefer header asks of a create."""

    representation: bool
    wait_seconds: float | None


_DELTA_SECONDS = re.compile(r"[0-9]{1,9}")


def preferences(prefer: str) -> Preferences:
    """The preferences of a Prefer header (RFC 7240) that a create honours: `return=
    representation` and `wait=<seconds>`. Names and the return value in any case, the first
    of each name counts, parameters after `;` and anything else are ignored."""
    found: dict[str, str] = {}
    for preference in prefer.split(","):
        name, _, value = preference.partition(";")[0].partition("=")
        found.setdefault(name.strip().lower(), value.strip().strip('"'))
    wait = found.get("wait", "")
    return Preferences(
        representation=found.get("return", "").lower() == "representation",
        wait_seconds=float(wait) if _DELTA_SECONDS.fullmatch(wait) else None,
    )


async def _created(
    scope: ProjectScopeDep, score_ids: list[UUID], kind: str, ids: BaseModel, prefer: str | None
) -> BaseModel | Response:
    """The answer to a create: its ids, or, if Prefer asks for it, the stored scores (201)
    or, when they are not stored in time, the ids with a 202."""
    if prefer is None:
        return ids
    preferred = preferences(prefer)
    if not preferred.representation:
        return ids
    wait = service.wait_seconds(scope, preferred.wait_seconds)
    stored = await service.stored_representation(scope, score_ids, kind, wait)
    if stored is None:
        return Response(to_json(ids), status_code=202, media_type="application/json")
    return Response(
        stored, status_code=201, headers=PREFERENCE_APPLIED, media_type="application/json"
    )


@writes.post(
    CREATE_PATH,
    summary="Create a score",
    description=(
        "Creates a score. A 200 means the broker has durably accepted it; the worker stores it "
        "moments later. With `Prefer: return=representation` the answer waits until it is "
        "stored: 201 with the stored score, or 202 if it is not stored within the wait."
    ),
    response_model=ScoreCreateRes,
    responses={
        201: {
            "model": ScoreReadRes,
            "description": "With `Prefer: return=representation`: the score, stored",
            "headers": _PREFERENCE_APPLIED_HEADER,
        },
        202: {"model": ScoreCreateRes, "description": _ACCEPTED_NOT_STORED},
        **_WRITE_ERRORS,
    },
)
async def score_create(
    scope: ProjectScopeDep,
    body: ScoreCreateBody,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> Any:  # ScoreCreateRes, or a Response (_created); FastAPI takes no union with a Response
    """Create one score."""
    score_ids = await service.create_scores(
        scope,
        [body],
        kind="single",
        idempotency_key=idempotency_key,
        idempotency_ttl_seconds=scope.services.settings.idempotency_key_ttl_seconds,
    )
    return await _created(
        scope, score_ids, "single", ScoreCreateRes(score_id=str(score_ids[0])), prefer
    )


@writes.post(
    "/v2/{entity}/{project}/scores/batch",
    summary="Create scores in a batch",
    description=(
        "Creates up to 1000 scores (body at most MAX_BATCH_BODY_BYTES, default 16 MiB). "
        "All are validated first: one invalid item fails the whole request with a 422 "
        "whose loc names it. A 200 means the broker has durably accepted every one. With "
        "`Prefer: return=representation` the answer waits until all are stored: 201 with "
        "the stored scores in request order, or 202 if they are not all stored within the wait."
    ),
    response_model=ScoreBatchCreateRes,
    responses={
        201: {
            "model": list[ScoreReadRes],
            "description": (
                "With `Prefer: return=representation`: the scores, stored, in request order"
            ),
            "headers": _PREFERENCE_APPLIED_HEADER,
        },
        202: {"model": ScoreBatchCreateRes, "description": _ACCEPTED_NOT_STORED},
        **_WRITE_ERRORS,
    },
)
async def score_batch_create(
    scope: ProjectScopeDep,
    body: ScoreBatchCreateBody,
    idempotency_key: IdempotencyKeyHeader = None,
    prefer: PreferHeader = None,
) -> Any:  # ScoreBatchCreateRes, or a Response (_created)
    """Create many scores at once."""
    score_ids = await service.create_scores(
        scope,
        body.scores,
        kind="batch",
        idempotency_key=idempotency_key,
        idempotency_ttl_seconds=scope.services.settings.idempotency_key_ttl_seconds,
    )
    ids = ScoreBatchCreateRes(score_ids=[str(score_id) for score_id in score_ids])
    return await _created(scope, score_ids, "batch", ids, prefer)


def _seconds(milliseconds: int | None) -> float | None:
    return None if milliseconds is None else milliseconds / MILLISECONDS


@router.get(
    "/v2/{entity}/{project}/scores/{score_id}",
    summary="Read a score",
    description=(
        "Reads a stored score. A score created moments ago (its UUIDv7 minted within "
        "READ_WAIT_RECENT_SECONDS) that the worker has not stored yet is waited for, up to "
        "`wait_ms`: the read answers as soon as it is stored, so a read right after a create "
        "finds it. A 404 comes after the wait, or at once for an older id."
    ),
    response_model=ScoreReadRes,
    responses={
        **_AUTH_ERRORS,
        404: {"model": ErrorRes, "description": "No such score (after the wait, if any)"},
        **_UNAVAILABLE,
    },
)
async def score_read(
    scope: ProjectScopeDep, score_id: UUID, wait_ms: WaitMilliseconds = None
) -> Response:
    """Read one score."""
    found = await service.read_score(scope, score_id, _seconds(wait_ms))
    return Response(found, media_type="application/json")


@router.get(
    "/v2/{entity}/{project}/scores/{score_id}/status",
    summary="What became of a score",
    description=(
        "Whether a score is stored, deleted, refused by the worker (dead-lettered, with "
        "why), accepted and still in flight, or unknown. Scoped to the key's entity and "
        "project like every read: another's score is `unknown` (or `accepted`, as any "
        "recent id is)."
    ),
    responses={**_AUTH_ERRORS, **_UNAVAILABLE},
)
async def score_status(scope: ProjectScopeDep, score_id: UUID) -> ScoreStatusRes:
    """What became of one score."""
    return await service.score_status(scope, score_id)


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
    until: Annotated[
        list[UUID] | None,
        Query(
            max_length=MAX_UNTIL_IDS,
            description=(
                "Score ids (up to 100) to wait for before listing: the last id of each of "
                "your creates lists everything you created until now. Waited for as a read "
                "waits (`wait_ms`); the list follows even if some are not stored in time"
            ),
        ),
    ] = None,
    wait_ms: WaitMilliseconds = None,
) -> StreamingResponse:
    """List scores."""
    chunks = await service.list_scores(
        scope, evaluation_run_id, limit, offset, after, until or (), _seconds(wait_ms)
    )
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
