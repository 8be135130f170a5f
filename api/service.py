"""What the API decides: accepted requests become confirmed messages; reads and deletes."""

import hashlib
import json
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
from api.schemas import ScoreCreateBody
from shared.contract import scorer_entity_problem
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
    charge_quota(scope, len(bodies))
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
    return score_ids


async def read_score(scope: ProjectScope, score_id: UUID) -> bytes:
    """A stored score of the project as JSON; NotFound otherwise."""
    with database_unavailable_as_503():
        found = await repository.read_score(
            scope.services.read_pool, scope.entity, scope.project, score_id
        )
    if found is None:
        raise NotFound(f"no score {score_id} in {scope.entity}/{scope.project}")
    return found


async def list_scores(
    scope: ProjectScope,
    evaluation_run_id: str | None,
    limit: int,
    offset: int,
    after: UUID | None,
) -> AsyncIterator[bytes]:
    """The project's scores as JSON Lines (after a score id, if given), streamed from the
    database."""
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
