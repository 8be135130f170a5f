"""What the API decides: accepted requests become confirmed messages; reads and deletes."""

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from fastapi import status

from api import repository
from api.deps import ProjectScope
from api.errors import ApiError, IdempotencyKeyReused, NotFound, database_unavailable_as_503
from api.publisher import MessageFields
from api.quotas import charge_quota
from api.schemas import ScoreCreateBody, ScoreStatusRes
from shared.contract import scorer_entity_problem
from shared.db import DATABASE_UNAVAILABLE
from shared.ids import new_score_id
from shared.score_fields import FIELD_NAMES


class ScorerOfAnotherEntity(ApiError):
    """Scorer refs naming another entity, which only the path can tell: a 422 on the body."""

    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT

    def __init__(self, problems: list[tuple[list[str | int], str]]) -> None:
        super().__init__(problems[0][1])
        self.problems = problems

    def content(self) -> Any:
        """Shaped like the body's other validation errors, one per offending score."""
        return {
            "detail": [
                {"loc": loc, "msg": msg, "type": "scorer_entity"} for loc, msg in self.problems
            ]
        }


def _check_scorers(entity: str, bodies: Sequence[ScoreCreateBody], kind: str) -> None:
    problems: list[tuple[list[str | int], str]] = []
    for index, body in enumerate(bodies):
        problem = scorer_entity_problem(body.scorer, entity)
        if problem is not None:
            loc: list[str | int] = ["body", "scores", index] if kind == "batch" else ["body"]
            problems.append(([*loc, "scorer"], problem))
    if problems:
        raise ScorerOfAnotherEntity(problems)


def score_message(
    scope: ProjectScope, body: ScoreCreateBody, score_id: UUID, created_at: datetime
) -> MessageFields:
    """The fields of a score's message (ScoreMessage), in the order of SCORE_FIELDS: the
    body's, the path's entity and project, and the id, time and key's id the api gives it."""
    # The body and path were validated with the contract's own field types, so the message
    # is built as plain fields, without a model to validate or construct (the tests check
    # that what the api publishes is a valid ScoreMessage).
    values = {
        **vars(body),
        "entity": scope.entity,
        "project": scope.project,
        "score_id": score_id,
        "created_at": created_at,
        "created_by": scope.principal.key_id,
    }
    return {name: values[name] for name in FIELD_NAMES}


def _request_hash(kind: str, bodies: Sequence[ScoreCreateBody]) -> bytes:
    canonical = json.dumps(
        [kind, [body.model_dump(mode="json") for body in bodies]],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).digest()


async def create_scores(
    scope: ProjectScope,
    bodies: Sequence[ScoreCreateBody],
    *,
    kind: str,
    idempotency_key: str | None,
    idempotency_ttl_seconds: float,
) -> list[UUID]:
    """Publish scores and return their ids once the broker has confirmed every one of them.

    With an Idempotency-Key, the ids are those recorded at the key's first use, so a retry
    republishes the same scores (which the worker stores once) instead of new ones. A scorer
    ref must name the path's entity (ScorerOfAnotherEntity otherwise).
    """
    _check_scorers(scope.entity, bodies, kind)
    charge = charge_quota(scope, len(bodies))
    try:
        score_ids = [new_score_id() for _ in bodies]
        if idempotency_key is not None:
            request_hash = _request_hash(kind, bodies)
            with database_unavailable_as_503():
                stored_hash, score_ids = await repository.claim_idempotency_key(
                    scope.services.pool,
                    scope.entity,
                    scope.project,
                    idempotency_key,
                    request_hash,
                    score_ids,
                    idempotency_ttl_seconds,
                )
            if stored_hash != request_hash:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was already used with a different request body"
                )
        created_at = datetime.now(UTC)
        await scope.services.publisher.publish_scores(
            [
                score_message(scope, body, score_id, created_at)
                for body, score_id in zip(bodies, score_ids, strict=True)
            ]
        )
    except BaseException:
        # Answered with an error (a 503 to retry, a reused key): the client was told the
        # scores were not taken, so they cost nothing. A batch split into several messages
        # may have had some confirmed; its retry carries an Idempotency-Key (README).
        charge.give_back()
        raise
    return score_ids


def minted_seconds_ago(score_id: UUID) -> float | None:
    """How long ago a UUIDv7 was minted, by its timestamp (negative: ahead of our clock);
    None for any other id."""
    if score_id.version != 7:
        return None
    return time.time() - (score_id.int >> 80) / 1000


def is_recent(scope: ProjectScope, score_id: UUID) -> bool:
    """Whether score_id is a UUIDv7 minted within READ_WAIT_RECENT_SECONDS (either way: ids
    minted by other clocks may be ahead of ours), which may be in flight to the database."""
    age = minted_seconds_ago(score_id)
    return age is not None and abs(age) <= scope.services.settings.read_wait_recent_seconds


def wait_seconds(scope: ProjectScope, asked: float | None) -> float:
    """How long a request may wait for scores: what it asked for (READ_WAIT_SECONDS if
    nothing), at most READ_WAIT_MAX_SECONDS."""
    settings = scope.services.settings
    return min(
        settings.read_wait_seconds if asked is None else asked, settings.read_wait_max_seconds
    )


async def _stored_scores(
    scope: ProjectScope, score_ids: Sequence[UUID], seconds: float
) -> dict[UUID, bytes]:
    """The scores of the project among score_ids, as JSON by id, waiting up to `seconds` for
    the worker to settle those not stored yet.

    A waiting request holds no database connection: it waits for the listener's
    announcement (api/stored_events.py), which brings the scores it waits for, or re-reads
    when the listener asks it to or cannot hear announcements. Past READ_MAX_WAITING
    waiting requests, it does not wait, or waits in the place of another entity's request
    (StoredEvents.watch), which then answers with what it finds.
    """
    pool = scope.services.read_pool

    async def read(ids: Sequence[UUID]) -> dict[UUID, bytes]:
        return await repository.read_scores(pool, scope.entity, scope.project, ids)

    if seconds <= 0:
        return await read(score_ids)
    events = scope.services.stored_events
    wanted = list(dict.fromkeys(score_ids))
    # Watching before the first read: a score settled in between is found by it, and one
    # settled after it is announced to the watch. One read, as without waiting.
    with events.watch(wanted, scope.entity, scope.project) as watch:
        if watch is None:
            return await read(score_ids)
        # An id deleted before the watch began will not be announced again: waiting for
        # it would wait out the whole wait.
        found, deleted = await repository.read_scores_or_deleted(
            pool, scope.entity, scope.project, wanted
        )
        missing = [id_ for id_ in wanted if id_ not in found and id_ not in deleted]
        if not missing or watch.given_up:
            return found
        watch.narrow({str(score_id) for score_id in missing})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            await watch.wait(events.wait_at_most(remaining))
            if watch.settled:
                return found | watch.stored
            found |= watch.stored | await read(
                [score_id for score_id in missing if score_id not in watch.stored]
            )
            if watch.given_up or all(score_id in found for score_id in missing):
                return found
        return found


async def read_score(scope: ProjectScope, score_id: UUID, wait: float | None) -> bytes:
    """A stored score of the project as JSON; NotFound otherwise.

    A score not stored yet whose id is recent (is_recent) is waited for, up to `wait`
    seconds (wait_seconds), until the worker settles it.
    """
    seconds = wait_seconds(scope, wait) if is_recent(scope, score_id) else 0
    with database_unavailable_as_503():
        found = (await _stored_scores(scope, [score_id], seconds)).get(score_id)
    if found is None:
        raise NotFound(f"no score {score_id} in {scope.entity}/{scope.project}")
    return found


async def wait_until_stored(
    scope: ProjectScope, score_ids: Sequence[UUID], wait: float | None
) -> None:
    """Wait, up to `wait` seconds (wait_seconds), until the recent ones of score_ids are
    stored in the project or settled otherwise (deleted, refused)."""
    recent = [score_id for score_id in score_ids if is_recent(scope, score_id)]
    if recent:
        with database_unavailable_as_503():
            await _stored_scores(scope, recent, wait_seconds(scope, wait))


async def stored_representation(
    scope: ProjectScope, score_ids: Sequence[UUID], kind: str, wait: float
) -> bytes | None:
    """The stored scores as GET answers them (a JSON list for a batch), once all are stored;
    None if they are not within `wait` seconds (or the database cannot say): they were
    accepted all the same, so this never fails."""
    try:
        found = await _stored_scores(scope, score_ids, wait)
    except DATABASE_UNAVAILABLE:
        return None
    if any(score_id not in found for score_id in score_ids):
        return None
    if kind == "single":
        return found[score_ids[0]]
    return b"[" + b",".join(found[score_id] for score_id in score_ids) + b"]"


def _at(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def score_status(scope: ProjectScope, score_id: UUID) -> ScoreStatusRes:
    """What became of a score, as the project's key may know it (ScoreStatusRes)."""
    with database_unavailable_as_503():
        fate = await repository.score_fate(
            scope.services.read_pool, scope.entity, scope.project, score_id
        )
    if fate["stored_at"] is not None:
        return ScoreStatusRes(state="stored", reason=f"stored at {_at(fate['stored_at'])}")
    if fate["deleted_at"] is not None:
        return ScoreStatusRes(
            state="deleted",
            reason=f"deleted at {_at(fate['deleted_at'])}: a deleted score is never stored again",
        )
    if fate["reason"] is not None:
        return ScoreStatusRes(
            state="dead_lettered",
            reason=(
                f"{fate['reason']}: {fate['detail']} (refused at {_at(fate['failed_at'])}; "
                "its message waits in scores.dead until an operator replays or purges it)"
            ),
        )
    recent = scope.services.settings.read_wait_recent_seconds
    age = minted_seconds_ago(score_id)
    if age is None:
        return ScoreStatusRes(state="unknown", reason="not a UUIDv7: no score has this id")
    if is_recent(scope, score_id):
        return ScoreStatusRes(
            state="accepted",
            reason=(
                f"in flight: a UUIDv7 minted {max(age, 0):.1f} s ago (within {recent:g} s) that "
                "is not stored, deleted or refused yet; if a create was answered 200 with it, "
                "the worker has not stored it yet"
            ),
        )
    return ScoreStatusRes(
        state="unknown",
        reason=(
            f"not stored in this project, deleted or refused, and minted more than {recent:g} s "
            "ago: the service knows nothing of it (unless its message is still queued behind "
            "a worker that far behind)"
        ),
    )


async def list_scores(
    scope: ProjectScope,
    evaluation_run_id: str | None,
    limit: int,
    offset: int,
    after: UUID | None,
    until: Sequence[UUID] = (),
    wait: float | None = None,
) -> AsyncIterator[bytes]:
    """The project's scores as JSON Lines (after a score id, if given), streamed from the
    database, once the scores `until` names are stored (wait_until_stored)."""
    await wait_until_stored(scope, until, wait)
    with database_unavailable_as_503():
        return await repository.open_score_stream(
            scope.services.read_pool,
            scope.entity,
            scope.project,
            evaluation_run_id,
            limit,
            offset,
            after,
        )


async def delete_scores(scope: ProjectScope, score_ids: Sequence[UUID]) -> int:
    """Delete scores for good; returns how many stored rows went."""
    with database_unavailable_as_503():
        return await repository.delete_scores(
            scope.services.pool, scope.entity, scope.project, score_ids
        )
