"""When the broker cannot take more scores, the API answers 503 + Retry-After at once.

Two kinds of refusal: `scores.persist` at its length limit (`x-overflow: reject-publish`,
so the broker nacks each publish), and a memory alarm (the broker blocks publishing
connections and confirms nothing until it clears). Either way a client must get a prompt
503, far below PUBLISH_TIMEOUT_SECONDS, and once the broker takes scores again the same
app answers 200 without a restart. Every score answered 200 ends up as exactly one row.

The queue limits need a vhost of their own (queue arguments are fixed once declared); the
alarm needs a RabbitMQ node of the test's own, since the machine's node is shared.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from shared.settings import MIB, Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import (
    ENTITY,
    PROJECT,
    basic_auth,
    client_for,
    running_app,
    score_body,
    wait_for_count,
)
from tests.support.processes import connect_broker, running_worker, wait_until
from tests.support.rabbitmq_node import RabbitMQNode

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
PUBLISH_TIMEOUT_SECONDS = 5.0
# A refusal needs one round trip to the broker at most; a second is a generous bound.
PROMPT_SECONDS = 1.0
POSTERS = 5
RECOVERY_SECONDS = 15.0
QUEUE_MAX_LENGTH = 50
# Each score in the byte-limit case carries a value this long, so that five fit in 1 MiB.
LARGE_VALUE_CHARS = 200_000
SCORES_FITTING_IN_A_MIB = 5
REFUSED_POSTS = 20


@dataclass(frozen=True)
class Answer:
    """One POST: its status, when (event loop clock) it was sent and answered, and what for."""

    status: int
    sent: float
    answered: float
    score_id: str | None
    retry_after: str | None
    text: str

    @property
    def seconds(self) -> float:
        """How long the API took to answer."""
        return self.answered - self.sent


class ScoreClient:
    """Posts scores to the in-process app and keeps every answer."""

    def __init__(self, client: httpx.AsyncClient, key: str, value: object) -> None:
        self._client = client
        self._headers = basic_auth(key)
        self._value = value
        self.answers: list[Answer] = []

    async def post(self) -> Answer:
        """POST one valid score."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        response = await self._client.post(
            SCORES_PATH, json=score_body(value=self._value), headers=self._headers
        )
        ok = response.status_code == 200
        answer = Answer(
            status=response.status_code,
            sent=sent,
            answered=loop.time(),
            score_id=response.json()["score_id"] if ok else None,
            retry_after=response.headers.get("Retry-After"),
            text=response.text,
        )
        self.answers.append(answer)
        return answer

    async def post_until_accepted(self, timeout: float = RECOVERY_SECONDS) -> Answer:
        """POST until the API answers 200; every answer on the way must be a prompt 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            answer = await self.post()
            if answer.status == 200:
                return answer
            assert_prompt_503(answer)
            assert loop.time() < deadline, f"still refused after {timeout}s: {answer.text}"
            await asyncio.sleep(0.05)

    def accepted_ids(self) -> list[str]:
        """The score_id of every 200."""
        return [answer.score_id for answer in self.answers if answer.score_id is not None]


def assert_prompt_503(answer: Answer) -> None:
    """A 503 with Retry-After and a reason, answered well before any confirm could time out."""
    assert answer.status == 503, answer
    assert answer.retry_after is not None, answer
    assert int(answer.retry_after) >= 1, answer
    detail = json.loads(answer.text)["detail"]
    assert isinstance(detail, str), answer
    assert detail, answer
    assert answer.seconds < PROMPT_SECONDS, answer


@contextlib.asynccontextmanager
async def score_client(
    application: FastAPI, key: str, value: object = 0.5
) -> AsyncIterator[tuple[ScoreClient, httpx.AsyncClient]]:
    """A ScoreClient for the app, and the raw client for /readyz."""
    async with client_for(application) as client:
        yield ScoreClient(client, key, value), client


async def assert_rows_are(db: asyncpg.Connection, accepted: list[str], extra: int = 0) -> None:
    """Every accepted score is one row; at most `extra` rows the API did not answer 200 for."""
    assert len(set(accepted)) == len(accepted)
    query = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"
    assert await wait_for_count(db, query, len(accepted), accepted) == len(accepted)
    stored = [str(row["score_id"]) for row in await db.fetch("SELECT score_id FROM scores")]
    assert len(stored) == len(set(stored))
    unanswered = set(stored) - set(accepted)
    assert len(unanswered) <= extra, f"{len(unanswered)} rows nobody was answered 200 for"


@pytest.mark.parametrize(
    ("limit", "value", "fitting"),
    [
        ({"queue_max_length": QUEUE_MAX_LENGTH}, 0.5, QUEUE_MAX_LENGTH),
        ({"queue_max_length_bytes": MIB}, "x" * LARGE_VALUE_CHARS, SCORES_FITTING_IN_A_MIB),
    ],
    ids=["x-max-length", "x-max-length-bytes"],
)
async def test_a_full_queue_gets_prompt_503s_until_a_worker_drains_it(
    settings: Settings,
    bare_vhost: str,
    db: asyncpg.Connection,
    api_key: str,
    limit: dict[str, int],
    value: object,
    fitting: int,
) -> None:
    bounded = settings.model_copy(
        update={
            "publish_timeout_seconds": PUBLISH_TIMEOUT_SECONDS,
            **limit,
        }
    )
    async with (
        running_app(bounded) as application,
        score_client(application, api_key, value) as (scores, _),
        connect_broker(bounded) as broker,
    ):
        for _ in range(fitting):
            answer = await scores.post()
            assert answer.status == 200, answer

        refused = [await scores.post() for _ in range(REFUSED_POSTS)]
        # A quorum queue applies its limit after an enqueue: the score that takes it over
        # the limit is kept (and confirmed), every later one is refused.
        overshoot = 1 if refused[0].status == 200 else 0
        for answer in refused[overshoot:]:
            assert_prompt_503(answer)
        accepted_while_full = len(scores.accepted_ids())
        assert accepted_while_full in (fitting, fitting + 1)
        assert await broker.ready_count(QUEUE) == accepted_while_full

        async with running_worker(bounded):
            assert await broker.wait_for_ready_count(QUEUE, 0) == 0
            await scores.post_until_accepted()
            for _ in range(3):
                answer = await scores.post()
                assert answer.status == 200, answer
            await assert_rows_are(db, scores.accepted_ids())
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0


@pytest.fixture
def alarm_settings(settings: Settings, own_node: RabbitMQNode) -> Settings:
    """Settings pointing at the tests' own node, where an alarm may be raised."""
    return settings.model_copy(
        update={"amqp_url": own_node.amqp_url, "publish_timeout_seconds": PUBLISH_TIMEOUT_SECONDS}
    )


async def test_a_memory_alarm_gets_prompt_503s_and_unready_then_200s_once_it_clears(
    alarm_settings: Settings, own_node: RabbitMQNode, db: asyncpg.Connection, api_key: str
) -> None:
    async with (
        running_worker(alarm_settings),
        running_app(alarm_settings) as application,
        score_client(application, api_key) as (scores, client),
    ):
        for _ in range(3):
            answer = await scores.post()
            assert answer.status == 200, answer

        await own_node.raise_memory_alarm()
        during_alarm = [await scores.post() for _ in range(5)]
        readyz = (await client.get("/readyz")).status_code
        # One comparison of everything observed, so that a failure shows the whole picture.
        observed = [(answer.status, round(answer.seconds, 3)) for answer in during_alarm]
        prompt = [(answer.status, answer.seconds < PROMPT_SECONDS) for answer in during_alarm]
        assert (prompt, readyz) == ([(503, True)] * len(during_alarm), 503), (
            f"while the node had a memory alarm, posts were answered (status, seconds) "
            f"{observed} with publish_timeout_seconds {PUBLISH_TIMEOUT_SECONDS}; then /readyz "
            f"answered {readyz}"
        )
        for answer in during_alarm:
            assert_prompt_503(answer)

        await own_node.clear_memory_alarm()
        await scores.post_until_accepted()
        for _ in range(3):
            answer = await scores.post()
            assert answer.status == 200, answer
        assert (await client.get("/readyz")).status_code == 200
        # The first post after the alarm reached the broker before it blocked the connection:
        # answered 503 at once, it may still be stored once the alarm clears. No other may.
        await assert_rows_are(db, scores.accepted_ids(), extra=1)


async def test_posts_flowing_into_a_memory_alarm_turn_into_prompt_503s_then_200s_again(
    alarm_settings: Settings, own_node: RabbitMQNode, db: asyncpg.Connection, api_key: str
) -> None:
    async with (
        running_worker(alarm_settings),
        running_app(alarm_settings) as application,
        score_client(application, api_key) as (scores, client),
    ):
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def keep_posting() -> None:
            while not stop.is_set():
                await scores.post()
                await asyncio.sleep(0.01)

        def answered_since(since: float) -> list[Answer]:
            return [answer for answer in scores.answers if answer.sent >= since]

        posters = [asyncio.create_task(keep_posting()) for _ in range(POSTERS)]
        try:
            await wait_until(lambda: len(scores.accepted_ids()) >= 50, "50 scores accepted")
            await own_node.raise_memory_alarm()
            # Publishes in flight when the broker blocks wait for a confirm that cannot come
            # before the alarm clears; posts after the API noticed (/readyz says so) must not.
            await _wait_for_readyz(client, 503)
            noticed = loop.time()
            await wait_until(
                lambda: len(answered_since(noticed)) >= 20,
                "20 answers after the API noticed the block",
                timeout=PUBLISH_TIMEOUT_SECONDS + RECOVERY_SECONDS,
            )
            clearing = loop.time()
            await own_node.clear_memory_alarm()
            await _wait_for_readyz(client, 200)
            ready_again = loop.time()
            await wait_until(
                lambda: sum(a.status == 200 for a in answered_since(ready_again)) >= 20,
                "20 scores accepted after the alarm cleared",
                timeout=RECOVERY_SECONDS,
            )
        finally:
            stop.set()
            await asyncio.gather(*posters)

        for answer in answered_since(noticed):
            if answer.answered < clearing:
                assert_prompt_503(answer)
        for answer in scores.answers:
            assert answer.status in (200, 503), answer
            assert answer.seconds < PUBLISH_TIMEOUT_SECONDS + 1, answer
            if answer.status == 503:
                assert answer.retry_after is not None, answer
        # A post in flight when the broker blocked (at most one per poster) reached the broker
        # and was answered 503; its score may be stored once the alarm clears.
        await assert_rows_are(db, scores.accepted_ids(), extra=POSTERS)


async def _wait_for_readyz(client: httpx.AsyncClient, status: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_SECONDS
    while (await client.get("/readyz")).status_code != status:
        assert loop.time() < deadline, f"/readyz not {status} within {RECOVERY_SECONDS}s"
        await asyncio.sleep(0.02)
