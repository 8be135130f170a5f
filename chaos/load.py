"""The chaos run's clients: they post as the README tells clients to, and remember every 200.

Each request carries its own Idempotency-Key and is retried, with the same key and body, on
a 503 or a connection error, after a short backoff and on the other api. Each score carries
a marker of its own in its value ({"chaos": key, "i": index}) and the run's
evaluation_run_id, so that the report can find a 200's row, and count two rows for one marker.
"""

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx

ENTITY = "chaos"
PROJECT = "load"
SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
BATCH_PATH = f"{SCORES_PATH}/batch"
SCORER = f"weave:///{ENTITY}/{PROJECT}/op/exact_match:chaos"
CLIENTS = 8
BATCH_SIZE = 20
# Every BATCH_EVERY-th request of a client is a batch, the others single scores.
BATCH_EVERY = 3
REQUEST_TIMEOUT_SECONDS = 15.0
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0


@dataclass
class LoadRecord:
    """What the clients saw: every attempt's answer, and every score answered 200."""

    started: float = 0.0
    stopped: float = 0.0
    attempts: int = 0
    ok: int = 0
    unavailable: int = 0
    # Neither 200 nor 503: "status <code>" or the transport error's class name.
    other: Counter[str] = field(default_factory=Counter)
    # Requests still unanswered with a 200 when the load stopped.
    abandoned: int = 0
    # score_id -> marker ("<key>/<index>") of every score in a 200.
    accepted: dict[str, str] = field(default_factory=dict)
    # The time (event loop clock) of each 200, in order.
    ok_times: list[float] = field(default_factory=list)
    # Per api, in the order given: the longest time from sending a request it answered 503 (or
    # dropped) to its next 200 (or to the stop). A client moves to the other api after a 503,
    # which hides an api that keeps answering 503 from the longest gap with no 200 at all.
    longest_unavailable: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Request:
    path: str
    key: str
    body: dict[str, Any]
    markers: tuple[str, ...]


class ChaosLoad:
    """CLIENTS clients posting singles and batches to several apis until stopped."""

    def __init__(
        self,
        api_urls: Sequence[str],
        api_key: str,
        run_id: str,
        *,
        clients: int = CLIENTS,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self._apis = [
            httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_SECONDS, limits=limits)
            for url in api_urls
        ]
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._run_id = run_id
        self._clients = clients
        self._batch_size = batch_size
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Per api: since when its answers have been other than 200 (None: its last was a 200).
        self._unavailable_since: list[float | None] = [None] * len(api_urls)
        self.record = LoadRecord(longest_unavailable=[0.0] * len(api_urls))

    async def __aenter__(self) -> Self:
        self.record.started = asyncio.get_running_loop().time()
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self._clients)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> LoadRecord:
        """Stop: each client ends its attempt in flight and retries no more."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.record.stopped = asyncio.get_running_loop().time()
            for index in range(len(self._apis)):
                self._answered(index, True, self.record.stopped)
            try:
                await asyncio.gather(*self._tasks)
            finally:
                for api in self._apis:
                    await api.aclose()
        return self.record

    async def _client(self, n: int) -> None:
        for seq in itertools.count():
            if self._stopping.is_set():
                return
            await self._until_ok(self._request(n, seq), first_api=(n + seq) % len(self._apis))

    def _request(self, n: int, seq: int) -> _Request:
        key = f"{self._run_id}-{n}-{seq}"
        size = self._batch_size if seq % BATCH_EVERY == BATCH_EVERY - 1 else 1
        scores = [
            {
                "prediction_id": f"prediction-{n}-{seq}-{i}",
                "scorer": SCORER,
                "value": {"chaos": key, "i": i},
                "evaluation_run_id": self._run_id,
            }
            for i in range(size)
        ]
        markers = tuple(f"{key}/{i}" for i in range(size))
        if size == 1:
            return _Request(SCORES_PATH, key, scores[0], markers)
        return _Request(BATCH_PATH, key, {"scores": scores}, markers)

    async def _until_ok(self, request: _Request, first_api: int) -> None:
        """Post until a 200, or until stopped; the same key and body every time."""
        headers = {**self._headers, "Idempotency-Key": request.key}
        backoff = FIRST_BACKOFF_SECONDS
        for attempt in itertools.count():
            api = (first_api + attempt) % len(self._apis)
            self.record.attempts += 1
            sent = asyncio.get_running_loop().time()
            retry_after = await self._post(self._apis[api], request, headers)
            if not self._stopping.is_set():
                self._answered(api, retry_after is None, sent)
            if retry_after is None:
                return
            if self._stopping.is_set():
                self.record.abandoned += 1
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(retry_after, backoff))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _post(
        self, api: httpx.AsyncClient, request: _Request, headers: dict[str, str]
    ) -> float | None:
        """One attempt; None once answered for good (a 200, or a refusal no retry changes),
        else how long to wait before retrying."""
        try:
            response = await api.post(request.path, json=request.body, headers=headers)
        except httpx.TransportError as exc:
            self.record.other[type(exc).__name__] += 1
            return MAX_BACKOFF_SECONDS
        if response.status_code == 200:
            self._accept(request, response.json())
            return None
        if response.status_code == 503:
            self.record.unavailable += 1
            return float(response.headers.get("Retry-After", MAX_BACKOFF_SECONDS))
        # Anything else is a bug the report shows; retrying it would only repeat it.
        self.record.other[f"status {response.status_code}"] += 1
        return None

    def _answered(self, api: int, ok: bool, sent: float) -> None:
        """Note an answer of api to a request sent then (ok: a 200, or a refusal no retry
        changes)."""
        since = self._unavailable_since[api]
        if not ok:
            self._unavailable_since[api] = sent if since is None else since
        elif since is not None:
            now = asyncio.get_running_loop().time()
            longest = self.record.longest_unavailable
            longest[api] = max(longest[api], now - since)
            self._unavailable_since[api] = None

    def _accept(self, request: _Request, answer: dict[str, Any]) -> None:
        ids = answer["score_ids"] if "score_ids" in answer else [answer["score_id"]]
        for score_id, marker in zip(ids, request.markers, strict=True):
            self.record.accepted[score_id] = marker
        self.record.ok += 1
        self.record.ok_times.append(asyncio.get_running_loop().time())
