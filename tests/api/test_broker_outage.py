"""While RabbitMQ is unreachable the API answers 503, never a 200 it cannot keep; then recovers.

The API reaches the broker through a TcpProxy that the tests cut and restore; the machine's
RabbitMQ keeps running. A worker on a direct connection stores whatever was accepted, so the
tests can check that every 200 became exactly one row.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
from fastapi import FastAPI

from api.app import create_app
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, client_for, score_body, wait_for_count
from tests.support.processes import api_process, running_worker, wait_until
from tests.support.tcp_proxy import TcpProxy

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
COUNT_ACCEPTED = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"
RECOVERY_SECONDS = 10.0
# A 503 for an unreachable broker needs no round trip; a second is a generous bound.
PROMPT_SECONDS = 1.0


@dataclass(frozen=True)
class Answer:
    """One POST and when, on the event loop's clock, it was sent and answered."""

    sent: float
    answered: float
    response: httpx.Response

    @property
    def seconds(self) -> float:
        """How long the API took to answer."""
        return self.answered - self.sent


class ScoreClient:
    """Posts scores to one API and keeps every answer."""

    def __init__(self, client: httpx.AsyncClient, key: str) -> None:
        self._client = client
        self._headers = basic_auth(key)
        self.answers: list[Answer] = []
        self.in_flight = 0

    async def post(self) -> Answer:
        """POST one valid score."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        self.in_flight += 1
        try:
            response = await self._client.post(
                SCORES_PATH, json=score_body(), headers=self._headers
            )
        finally:
            self.in_flight -= 1
        answer = Answer(sent, loop.time(), response)
        self.answers.append(answer)
        return answer

    async def post_until_accepted(self, timeout: float = RECOVERY_SECONDS) -> Answer:
        """POST until the API answers 200; every other answer on the way must be a 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            answer = await self.post()
            if answer.response.status_code == 200:
                return answer
            assert_unavailable(answer)
            assert loop.time() < deadline, f"still 503 after {timeout}s: {answer.response.text}"
            await asyncio.sleep(0.1)

    def accepted_ids(self) -> list[str]:
        """The score_id of every 200."""
        return [
            answer.response.json()["score_id"]
            for answer in self.answers
            if answer.response.status_code == 200
        ]


def assert_unavailable(answer: Answer) -> None:
    """A 503 the client can act on: Retry-After and a JSON detail."""
    response = answer.response
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail


@contextlib.asynccontextmanager
async def proxied_api(settings: Settings, proxy: TcpProxy) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running, reaching RabbitMQ only through the proxy."""
    application = create_app(
        settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
    )
    async with application.router.lifespan_context(application):
        yield application


@contextlib.asynccontextmanager
async def score_client(application: FastAPI, key: str) -> AsyncIterator[ScoreClient]:
    """A ScoreClient for the in-process app."""
    async with client_for(application) as client:
        yield ScoreClient(client, key)


async def assert_each_accepted_score_is_one_row(
    db: asyncpg.Connection, accepted: list[str]
) -> None:
    """Every score_id the API answered 200 for is stored, and stored once."""
    assert await wait_for_count(db, COUNT_ACCEPTED, len(accepted), accepted) == len(accepted)
    rows = await db.fetch("SELECT score_id FROM scores WHERE score_id = ANY($1::uuid[])", accepted)
    assert sorted(str(row["score_id"]) for row in rows) == sorted(accepted)
    assert len(set(accepted)) == len(accepted)


async def test_a_cut_broker_gets_prompt_503s_then_200s_again_without_a_restart(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    async with (
        running_worker(settings),
        TcpProxy.for_url(settings.amqp_url) as proxy,
        proxied_api(settings, proxy) as application,
        score_client(application, api_key) as scores,
    ):
        await asyncio.wait_for(application.state.services.publisher.wait_ready(), timeout=10)
        for _ in range(3):
            assert (await scores.post()).response.status_code == 200

        await proxy.cut()
        for _ in range(5):
            answer = await scores.post()
            assert_unavailable(answer)
            assert answer.seconds < PROMPT_SECONDS

        await proxy.restore()
        await scores.post_until_accepted()
        for _ in range(3):
            assert (await scores.post()).response.status_code == 200

        accepted = scores.accepted_ids()
        assert len(accepted) >= 7
        await assert_each_accepted_score_is_one_row(db, accepted)


async def test_posts_in_flight_when_the_broker_drops_get_200_only_if_stored(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    async with (
        running_worker(settings),
        # Confirms that take 20 ms keep publishes in flight whenever the cut comes.
        TcpProxy.for_url(settings.amqp_url, latency=0.02) as proxy,
        proxied_api(settings, proxy) as application,
        score_client(application, api_key) as scores,
    ):
        await asyncio.wait_for(application.state.services.publisher.wait_ready(), timeout=10)
        loop = asyncio.get_running_loop()
        recovered = asyncio.Event()

        async def keep_posting() -> None:
            # Until the API has recovered; a short pause keeps the 503 path from spinning.
            while not recovered.is_set():
                await scores.post()
                await asyncio.sleep(0.005)

        posters = [asyncio.create_task(keep_posting()) for _ in range(20)]
        try:
            await _wait_for_answers(scores, 200, 100)
            # Posts that share a message are answered together and pause together: cut
            # while some are waiting for their confirm.
            await wait_until(lambda: scores.in_flight > 0, "a post in flight")
            cut_at = loop.time()
            await proxy.cut()
            cut_done = loop.time()
            await _wait_for_answers(scores, 503, 50)
            restored_at = loop.time()
            await proxy.restore()
            await _wait_for_answers_after(scores, 200, restored_at, 50)
        finally:
            recovered.set()
            await asyncio.gather(*posters)

        statuses = {answer.response.status_code for answer in scores.answers}
        assert statuses == {200, 503}, statuses
        for answer in scores.answers:
            assert answer.seconds < settings.publish_timeout_seconds + 1, answer
            if answer.response.status_code != 200:
                assert_unavailable(answer)
            if cut_done <= answer.sent and answer.answered < restored_at:
                assert answer.response.status_code == 503, answer.response.text
        assert any(a.sent < cut_at < a.answered for a in scores.answers), (
            "none in flight at the cut"
        )

        await assert_each_accepted_score_is_one_row(db, scores.accepted_ids())


async def _wait_for_answers(scores: ScoreClient, status: int, count: int) -> None:
    await _wait_for_answers_after(scores, status, asyncio.get_running_loop().time(), count)


async def _wait_for_answers_after(
    scores: ScoreClient, status: int, since: float, count: int
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_SECONDS
    while True:
        seen = sum(
            1
            for answer in scores.answers
            if answer.sent >= since and answer.response.status_code == status
        )
        if seen >= count:
            return
        assert loop.time() < deadline, f"{seen} answers {status} in {RECOVERY_SECONDS}s"
        await asyncio.sleep(0.02)


async def test_the_api_started_while_the_broker_is_unreachable_answers_503_until_it_is(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    async with TcpProxy.for_url(settings.amqp_url) as proxy:
        await proxy.cut()
        unreachable = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        # api_process returns only once the app serves, so a start-up that hangs fails here.
        async with (
            api_process(unreachable, ready=False) as api,
            httpx.AsyncClient(base_url=api.base_url, timeout=10) as client,
        ):
            scores = ScoreClient(client, api_key)
            for _ in range(3):
                answer = await scores.post()
                assert_unavailable(answer)
                assert answer.seconds < PROMPT_SECONDS

            await proxy.restore()
            await scores.post_until_accepted(timeout=RECOVERY_SECONDS)
            assert (await scores.post()).response.status_code == 200

        async with running_worker(settings):
            await assert_each_accepted_score_is_one_row(db, scores.accepted_ids())
