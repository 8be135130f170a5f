"""What the worker announces to the apis when scores are settled, and how.

The worker sends a PostgreSQL NOTIFY on CHANNEL inside each transaction that settles scores
(stores them, finds them stored or deleted already, or records why it refused them), so the
apis hear of them exactly when the commit makes them visible, and not at all if it rolls
back. A payload is the settled score ids, as text, joined by commas: at most IDS_PER_NOTIFY
of them (NOTIFY takes at most 8000 bytes; 200 ids take 7399), a batch taking as many
notifications as it needs.
"""

from collections.abc import Sequence
from typing import Final
from uuid import UUID

CHANNEL: Final = "score_ingest_settled"
IDS_PER_NOTIFY: Final = 200
SEPARATOR: Final = ","


def payloads(score_ids: Sequence[UUID | str]) -> list[str]:
    """The payloads that announce these score ids, IDS_PER_NOTIFY to a payload: each a UUID,
    or its canonical text (as the api publishes it, and the worker's decoding requires)."""
    ids = [score_id if type(score_id) is str else str(score_id) for score_id in score_ids]
    return [SEPARATOR.join(ids[i : i + IDS_PER_NOTIFY]) for i in range(0, len(ids), IDS_PER_NOTIFY)]


def settled_ids(payload: str) -> list[str]:
    """The score ids (canonical lower-case text) a notification announces."""
    return payload.split(SEPARATOR) if payload else []
