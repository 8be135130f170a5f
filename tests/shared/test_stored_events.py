"""The payloads that announce settled scores, and reading them back."""

from shared.ids import new_score_id
from shared.stored_events import IDS_PER_NOTIFY, payloads, settled_ids

NOTIFY_LIMIT_BYTES = 8000


def test_ids_are_announced_in_order_in_payloads_that_fit_a_notify() -> None:
    # UUIDs (a validated score's) and their canonical text (as the api publishes it).
    ids = [new_score_id() if n % 2 else str(new_score_id()) for n in range(2 * IDS_PER_NOTIFY + 1)]
    announced = payloads(ids)
    assert [len(settled_ids(payload)) for payload in announced] == [IDS_PER_NOTIFY] * 2 + [1]
    assert all(len(payload.encode()) < NOTIFY_LIMIT_BYTES for payload in announced)
    assert [id_ for payload in announced for id_ in settled_ids(payload)] == [str(i) for i in ids]


def test_no_ids_take_no_payload() -> None:
    assert payloads([]) == []
    assert settled_ids("") == []
