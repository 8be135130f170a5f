"""One LISTEN connection per api process, which wakes the requests waiting for scores.

The worker announces every id it settles (stored, found stored or deleted, or refused) with
a NOTIFY inside the transaction that settles it (shared/stored_events.py). An api process
listens on one connection of its own, made when the app starts and made again after it is
lost, and wakes the requests that wait for those ids: a waiting request holds no database
connection and costs no query while it waits. For each announcement that concerns waiting
requests the listener reads the scores once, for all of them, and hands each request the
ones of its project: a batch that settles hundreds of waiting reads costs one query, not a
herd of them on the read pool.

While the listener is down, announcements are lost: every waiting request is woken to
re-read at once when the connection goes and again when it is back, and in between waits
at most READ_WAIT_RECHECK_SECONDS before it re-reads, so nothing waits on an announcement
that cannot come.

At most READ_MAX_WAITING requests wait at once, shared fairly between entities: when every
place is taken, a request of an entity holding fewer than the entity holding the most (by
two or more) takes the place of that entity's longest-waiting request, which is answered
at once with what it finds (`Watch.given_up`); otherwise `watch` gives None and the request
is answered as if it asked for no wait. So one tenant may use every place while nobody
else waits, but cannot keep another from waiting (with reads of made-up fresh ids, lists
`until` them, or creates that prefer the representation): among the entities that wait, no
one holds more than one place over another's share.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from uuid import UUID

import asyncpg

from api import repository
from api.repository import BoundedPool
from shared.stored_events import CHANNEL, settled_ids

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_SECONDS = 5
# How often the idle listening connection is checked: a link that died silently (no reset)
# would otherwise leave the listener deaf without knowing it.
_PING_INTERVAL_SECONDS = 5
_PING_TIMEOUT_SECONDS = 2
_RETRY_MIN_SECONDS = 0.1
_RETRY_MAX_SECONDS = 5


class Watch:
    """The score ids one request waits for in a project; settled once each was announced,
    with the JSON of those stored in the project."""

    def __init__(self, score_ids: set[str], entity: str, project: str) -> None:
        self.pending = score_ids
        self.stored: dict[UUID, bytes] = {}
        self.entity = entity
        self._project = (entity, project)
        self._woken = asyncio.Event()
        self._given_up = False

    @property
    def settled(self) -> bool:
        """Whether every id was announced settled since the watch began."""
        return not self.pending

    @property
    def given_up(self) -> bool:
        """Whether the watch's place went to a request of an entity with fewer waiting: the
        request should answer with what it finds now, without waiting any longer."""
        return self._given_up

    def give_up(self) -> None:
        """Wake the request to answer now: its place is taken."""
        self._given_up = True
        self._woken.set()

    def settle(self, score_id: str, found: repository.SettledScore | None) -> None:
        """Note an id announced, and the score stored with it if it is in the watch's
        project; wake the request once none is pending."""
        self.pending.discard(score_id)
        if found is not None and (found.entity, found.project) == self._project:
            self.stored[UUID(score_id)] = found.json
        if not self.pending:
            self._woken.set()

    def narrow(self, score_ids: set[str]) -> None:
        """Wait for these of the ids only (the others were found stored)."""
        self.pending &= score_ids
        if not self.pending:
            self._woken.set()

    def recheck(self) -> None:
        """Wake the request to re-read: announcements may have been lost."""
        self._woken.set()

    async def wait(self, seconds: float) -> None:
        """Return when every id is settled, a re-read is asked for, or seconds pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._woken.wait()
        self._woken.clear()


class StoredEvents:
    """The api process's listener for settled scores, and the requests waiting on it."""

    def __init__(
        self, database_url: str, pool: BoundedPool, max_waiting: int, recheck_seconds: float
    ) -> None:
        self._url = database_url
        self._pool = pool
        self._max_waiting = max_waiting
        self._recheck_seconds = recheck_seconds
        self._watches: dict[str, set[Watch]] = {}
        self._waiting: set[Watch] = set()
        # Each entity's waiting requests, longest-waiting first (a dict as an ordered set).
        self._by_entity: dict[str, dict[Watch, None]] = {}
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """Whether announcements are being heard right now."""
        return self._connected

    @property
    def waiting(self) -> int:
        """Requests waiting right now."""
        return len(self._waiting)

    def waiting_of(self, entity: str) -> int:
        """Requests of an entity waiting right now."""
        return len(self._by_entity.get(entity, ()))

    def start(self) -> None:
        """Start listening, in the background; connecting is retried until it succeeds."""
        self._task = asyncio.create_task(self._listen_forever())

    async def close(self) -> None:
        """Stop listening, and reading what was announced."""
        for task in (self._task, *self._reads):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def wait_at_most(self, remaining: float) -> float:
        """How long a request may wait before it re-reads: the rest of its wait, or while
        announcements are not heard, READ_WAIT_RECHECK_SECONDS at most."""
        return remaining if self._connected else min(remaining, self._recheck_seconds)

    @contextlib.contextmanager
    def watch(self, score_ids: Iterable[UUID], entity: str, project: str) -> Iterator[Watch | None]:
        """A Watch of these ids of the project for the length of the block, or None when
        READ_MAX_WAITING requests wait already and the entity holds its share of them."""
        if len(self._waiting) >= self._max_waiting and not self._make_room_for(entity):
            yield None
            return
        watch = Watch({str(score_id) for score_id in score_ids}, entity, project)
        keys = list(watch.pending)
        self._add(watch)
        for key in keys:
            self._watches.setdefault(key, set()).add(watch)
        try:
            yield watch
        finally:
            self._remove(watch)
            for key in keys:
                watchers = self._watches.get(key)
                if watchers is not None:
                    watchers.discard(watch)
                    if not watchers:
                        del self._watches[key]

    def _add(self, watch: Watch) -> None:
        self._waiting.add(watch)
        self._by_entity.setdefault(watch.entity, {})[watch] = None

    def _remove(self, watch: Watch) -> None:
        self._waiting.discard(watch)
        of_entity = self._by_entity.get(watch.entity)
        if of_entity is not None:
            of_entity.pop(watch, None)
            if not of_entity:
                del self._by_entity[watch.entity]

    def _make_room_for(self, entity: str) -> bool:
        """Free a place for a request of entity, if another entity holds at least two more:
        its longest-waiting request gives its place up. Runs only when every place is taken,
        over at most READ_MAX_WAITING entities."""
        if not self._by_entity:  # READ_MAX_WAITING is 0: nobody waits
            return False
        most = max(self._by_entity.values(), key=len)
        if len(most) < self.waiting_of(entity) + 2:
            return False
        oldest = next(iter(most))
        self._remove(oldest)
        oldest.give_up()
        return True

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if not self._watches:  # the usual case under load: nobody waits
            return
        watched = [score_id for score_id in settled_ids(str(payload)) if score_id in self._watches]
        if watched:
            task = asyncio.create_task(self._settle(watched))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    async def _settle(self, score_ids: list[str]) -> None:
        """Read the announced scores once for every request waiting for them, and settle
        their watches; if the read fails, the requests re-read for themselves."""
        try:
            found = await repository.read_settled(self._pool, score_ids)
        except Exception as exc:  # unavailable or busy: each request tries on its own
            log.warning("reading %d announced scores failed: %s", len(score_ids), exc)
            for score_id in score_ids:
                for watch in list(self._watches.get(score_id, ())):
                    watch.recheck()
            return
        for score_id in score_ids:
            for watch in list(self._watches.get(score_id, ())):
                watch.settle(score_id, found.get(score_id))

    def _recheck_all(self) -> None:
        for watch in self._waiting:
            watch.recheck()

    async def _listen_forever(self) -> None:
        delay = _RETRY_MIN_SECONDS
        while True:
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=_CONNECT_TIMEOUT_SECONDS,
                    server_settings={"application_name": "score-ingest api listener"},
                )
            except Exception as exc:  # unreachable, refused, starting: try again later
                log.warning("the listener for stored scores cannot connect (%s); retrying", exc)
            else:
                delay = _RETRY_MIN_SECONDS  # connected: after a loss, try again at once
                try:
                    await self._listen(conn)
                except Exception as exc:  # the connection failed: make a new one
                    log.warning("the listener for stored scores lost its connection (%s)", exc)
                finally:
                    self._connected = False
                    self._recheck_all()
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_SECONDS)

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Listen on conn until it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        self._connected = True
        # What was announced before LISTEN took effect was not heard.
        self._recheck_all()
        log.info("listening for stored scores")
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PING_INTERVAL_SECONDS):
                    await lost.wait()
            if not lost.is_set():
                await conn.fetchval("SELECT 1", timeout=_PING_TIMEOUT_SECONDS)
        raise ConnectionError("the connection was closed")
