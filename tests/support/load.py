"""Load for fault tests: HTTP clients posting scores steadily, keeping every answer, and the
check that every score answered 200 was stored exactly once."""

import asyncio
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import asyncpg
import httpx

from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.processes import wait_until

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
CLIENTS = 20
# After a refusal a client pauses this long (a real one would honour Retry-After; a short
# pause keeps many answers coming while the fault lasts).
PAUSE_AFTER_REFUSAL_SECONDS = 0.05
REQUEST_TIMEOUT_SECONDS = 15.0
PROGRESS_SECONDS = 20.0
DRAIN_SECONDS = 30.0
COUNT_AMONG = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"


@dataclass(frozen=True)
class Outcome:
    """One POST: when it was sent and answered (event loop clock) and what came back."""

    sent: float
    answered: float
    status: int | None  # None: no HTTP answer at all
    score_id: str | None
    retry_after: str | None
    detail: str

    @property
    def seconds(self) -> float:
        """How long the API took to answer."""
        return self.answered - self.sent


class LoadGenerator:
    """CLIENTS concurrent clients posting scores to one API until stopped, keeping every answer."""

    def __init__(self, base_url: str, key: str, clients: int = CLIENTS) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=REQUEST_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
        )
        self._headers = basic_auth(key)
        self._clients = clients
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: list[Outcome] = []

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._post_continuously(n)) for n in range(self._clients)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop posting; returns once every request in flight was answered (or failed)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    def accepted_ids(self) -> list[str]:
        """The score_id of every 200."""
        return [o.score_id for o in self.outcomes if o.score_id is not None]

    def statuses(self) -> Counter[int | None]:
        """How many answers of each status (None: no answer)."""
        return Counter(o.status for o in self.outcomes)

    def sent_since(self, since: float) -> list[Outcome]:
        """The answers to posts sent at or after `since`."""
        return [o for o in self.outcomes if o.sent >= since]

    async def wait_for_accepted(self, count: int, since: float = 0.0) -> None:
        """Wait until `count` posts sent at or after `since` were answered 200."""
        await wait_until(
            lambda: sum(o.status == 200 for o in self.sent_since(since)) >= count,
            f"{count} scores accepted (answers so far: {dict(self.statuses())})",
            timeout=PROGRESS_SECONDS,
        )

    async def wait_for_answers(self, count: int, since: float) -> None:
        """Wait until `count` posts sent at or after `since` were answered, whatever the status."""
        await wait_until(
            lambda: len(self.sent_since(since)) >= count,
            f"{count} answers (answers so far: {dict(self.statuses())})",
            timeout=PROGRESS_SECONDS,
        )

    async def _post_continuously(self, client: int) -> None:
        loop = asyncio.get_running_loop()
        posted = 0
        while not self._stop.is_set():
            posted += 1
            body = score_body(prediction_id=f"load-{client}-{posted}", value=posted)
            sent = loop.time()
            try:
                response = await self._client.post(SCORES_PATH, json=body, headers=self._headers)
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(sent, loop.time(), None, None, None, repr(exc)))
                await asyncio.sleep(PAUSE_AFTER_REFUSAL_SECONDS)
                continue
            ok = response.status_code == 200
            self.outcomes.append(
                Outcome(
                    sent=sent,
                    answered=loop.time(),
                    status=response.status_code,
                    score_id=response.json()["score_id"] if ok else None,
                    retry_after=response.headers.get("Retry-After"),
                    detail="" if ok else response.text,
                )
            )
            if not ok:
                await asyncio.sleep(PAUSE_AFTER_REFUSAL_SECONDS)


async def assert_stored_exactly_once(
    db: asyncpg.Connection, expected: list[str], unanswered_allowed: int = 0
) -> None:
    """Each expected score_id becomes one row (waiting for the queue to drain); no strays.

    `unanswered_allowed` admits rows for posts answered 503 while the broker may still have
    kept the score (the connection dropped, or the confirm timed out, after the publish).
    """
    assert len(set(expected)) == len(expected), "a score_id was answered twice"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_SECONDS
    while (stored := await db.fetchval(COUNT_AMONG, expected)) < len(expected):
        assert loop.time() < deadline, f"{stored} of {len(expected)} scores stored"
        await asyncio.sleep(0.1)
    rows = [str(row["score_id"]) for row in await db.fetch("SELECT score_id FROM scores")]
    assert len(rows) == len(set(rows))
    strays = set(rows) - set(expected)
    assert len(strays) <= unanswered_allowed, (
        f"{len(strays)} rows nobody was answered 200 for (allowed: {unanswered_allowed})"
    )
