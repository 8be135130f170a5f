"""What the API decides: turning an accepted request into a confirmed score message."""

from datetime import UTC, datetime
from uuid import UUID

from api.deps import ProjectScope
from api.publisher import ScorePublisher
from api.schemas import ScoreCreateBody
from shared.contract import ScoreMessage
from shared.ids import new_score_id


def score_message(scope: ProjectScope, body: ScoreCreateBody) -> ScoreMessage:
    """The message for one score, stamped with a new id, the time and the key that sent it."""
    # The body and path were validated with the contract's own field types, so the message
    # is built without validating the same values a second time.
    return ScoreMessage.model_construct(
        score_id=new_score_id(),
        entity=scope.entity,
        project=scope.project,
        prediction_id=body.prediction_id,
        scorer=body.scorer,
        value=body.value,
        evaluation_run_id=body.evaluation_run_id,
        created_at=datetime.now(UTC),
        created_by=scope.principal.key_id,
    )


async def create_score(
    publisher: ScorePublisher, scope: ProjectScope, body: ScoreCreateBody
) -> UUID:
    """Publish one score and return its id once the broker has confirmed it."""
    message = score_message(scope, body)
    await publisher.publish_confirmed(message)
    return message.score_id
