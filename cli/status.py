"""`score-ingest status`: is everything up, and is every score on its way? One look for on-call.

What it reads, and how, so that looking changes nothing:

- each node of AMQP_URL: a connection opened and closed;
- PostgreSQL: a connection, and the newest stored score (the primary key's last entry);
- `scores.persist`, each of its QUEUE_SHARDS shards and `scores.dead`: ready messages and
  consumers by passive declaration, twice, `--sample-seconds` apart, for the rate at which
  the ready count changes;
- the dead letters by reason: one pass over `scores.dead` as `dlq list` takes it (held
  unacknowledged, returned in order when the channel closes), only when it holds at most
  `--dead-letters` letters;
- the health endpoints and /metrics of the apis and workers named with `--api`/`--worker`,
  twice, for the accepted and stored rates.

The persist queues themselves are never read: a quorum queue counts every delivery,
returned or not, towards QUEUE_DELIVERY_LIMIT, and a status run every few seconds would
dead-letter a stuck queue's head. So the oldest unstored score's age is worked out, not
seen: a queue is first in, first out, so the scores waiting were created after the newest
stored one, and the newest stored one's age bounds theirs from above (README, "Operating
it"). That holds with one queue only: with shards, a quiet shard's fresh score is stored
before a busy shard's older backlog, so then the age is unknown while scores wait.
"""

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final

import aio_pika
import asyncpg
import typer
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelClosed
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli._dead_letters import DeadLetterQueue, Filter, printable
from shared.broker import broker_nodes, node_address, tls_context
from shared.settings import Settings, get_settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, persist_queues

ACCEPTED_METRIC: Final = "score_ingest_scores_accepted_total"
PERSISTED_METRIC: Final = "score_ingest_scores_persisted_total"
HELD_METRIC: Final = "score_ingest_worker_held_messages"
_NEWEST_STORED = """
SELECT extract(epoch FROM clock_timestamp() - created_at)::float8
FROM scores ORDER BY score_id DESC LIMIT 1
"""


@dataclass
class NodeState:
    """One broker node of AMQP_URL."""

    node: str
    reachable: bool
    error: str | None = None


@dataclass
class QueueState:
    """A queue's ready messages and consumers, and how fast the ready count changed."""

    queue: str
    ready: int | None = None
    consumers: int | None = None
    ready_change_per_second: float | None = None
    error: str | None = None


@dataclass
class DeadLetterState:
    """What scores.dead holds, by x-dead-letter-reason (None: not read, see note)."""

    total: int | None = None
    by_reason: dict[str, int] | None = None
    note: str | None = None


@dataclass
class OldestUnstored:
    """The age of the oldest score accepted and not yet stored, and how it was found."""

    age_seconds: float | None
    basis: str
    too_old: bool = False


@dataclass
class EndpointState:
    """An api's or a worker's health endpoints, and its accepted or stored rate."""

    role: str
    url: str
    healthz: int | None = None
    readyz: int | None = None
    readiness: str | None = None
    rate_per_second: float | None = None
    held_messages: float | None = None
    error: str | None = None


@dataclass
class Status:
    """Everything `status` found, and what is wrong with it."""

    broker_nodes: list[NodeState]
    database: dict[str, Any]
    queues: list[QueueState]
    dead_letters: DeadLetterState
    oldest_unstored: OldestUnstored
    endpoints: list[EndpointState]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The form `--json` prints."""
        return {"ok": self.ok, **asdict(self)}


@dataclass(frozen=True)
class Options:
    """What the operator asked to look at, and how."""

    apis: tuple[str, ...]
    workers: tuple[str, ...]
    sample_seconds: float
    dead_letter_limit: int
    max_age_seconds: float
    timeout: float


def _error(exc: BaseException) -> str:
    return printable(str(exc) or type(exc).__name__)


async def _check_node(
    url: str, settings: Settings, answer_seconds: float
) -> tuple[NodeState, AbstractConnection | None]:
    node = node_address(url)
    try:
        connection = await asyncio.wait_for(
            aio_pika.connect(url, timeout=answer_seconds, ssl_context=tls_context(settings)),
            answer_seconds,
        )
    except Exception as exc:  # whatever stops a connection, the node is down
        return NodeState(node, reachable=False, error=_error(exc)), None
    return NodeState(node, reachable=True), connection


def _queues(settings: Settings) -> list[str]:
    return [*persist_queues(settings), DEAD_LETTER_QUEUE]


async def _sample_queues(
    connection: AbstractConnection, names: list[str], answer_seconds: float
) -> list[QueueState]:
    states = []
    for name in names:
        # A passive declaration of a missing queue closes its channel: one channel each.
        try:
            async with asyncio.timeout(answer_seconds), connection.channel() as channel:
                declared = await channel.declare_queue(name, passive=True)
                result = declared.declaration_result
                states.append(QueueState(name, result.message_count, result.consumer_count))
        except ChannelClosed as exc:
            states.append(QueueState(name, error=f"not declared ({_error(exc)})"))
        except Exception as exc:  # reported as the queue's state
            states.append(QueueState(name, error=_error(exc)))
    return states


async def _count_dead_letters(
    connection: AbstractConnection, total: int, limit: int, answer_seconds: float
) -> DeadLetterState:
    if total == 0:
        return DeadLetterState(total=0, by_reason={})
    if total > limit:
        return DeadLetterState(
            total=total,
            note=f"more than --dead-letters {limit}: reasons not read (score-ingest dlq list)",
        )
    reasons: Counter[str] = Counter()
    try:
        # Closing the channel returns every letter read, in order: nothing is acked.
        async with asyncio.timeout(answer_seconds + total / 100), connection.channel() as channel:
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
            async for _message, letter in DeadLetterQueue(channel, queue, total).browse(
                Filter(), None
            ):
                reasons[printable(letter.reason)] += 1
    except Exception as exc:  # the count stands; the reasons are unknown
        return DeadLetterState(total=total, note=f"reasons not read: {_error(exc)}")
    return DeadLetterState(total=total, by_reason=dict(reasons.most_common()))


async def _newest_stored_age(settings: Settings, answer_seconds: float) -> dict[str, Any]:
    """Whether PostgreSQL answers, and the age in seconds of the newest stored score."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=answer_seconds)
    except Exception as exc:  # whatever stops a connection, it is down
        return {"reachable": False, "error": _error(exc), "newest_stored_age_seconds": None}
    try:
        age = await conn.fetchval(_NEWEST_STORED, timeout=answer_seconds)
    except asyncpg.UndefinedTableError:
        return {
            "reachable": True,
            "error": "no scores table: run `score-ingest migrate`",
            "newest_stored_age_seconds": None,
        }
    except Exception as exc:  # reported as the database's state
        return {"reachable": True, "error": _error(exc), "newest_stored_age_seconds": None}
    finally:
        await conn.close(timeout=answer_seconds)
    return {"reachable": True, "error": None, "newest_stored_age_seconds": age}


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """A GET's status and body; an HTTP error status is an answer too."""
    try:
        # The scheme is checked when the option is read: http or https only.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(body: bytes, name: str) -> float | None:
    """The sum of a metric's samples in a /metrics page, or None if it has none."""
    values = [
        sample.value
        for family in text_string_to_metric_families(body.decode(errors="replace"))
        for sample in family.samples
        if sample.name == name
    ]
    return math.fsum(values) if values else None


async def _metrics(endpoint: EndpointState, answer_seconds: float) -> bytes | None:
    try:
        status, body = await asyncio.to_thread(_get, f"{endpoint.url}/metrics", answer_seconds)
    except Exception:  # the health checks say why
        return None
    return body if status == 200 else None


async def _check_health(endpoint: EndpointState, answer_seconds: float) -> None:
    try:
        endpoint.healthz, _ = await asyncio.to_thread(
            _get, f"{endpoint.url}/healthz", answer_seconds
        )
        endpoint.readyz, body = await asyncio.to_thread(
            _get, f"{endpoint.url}/readyz", answer_seconds
        )
    except Exception as exc:  # unreachable, refused, timed out: all the same
        endpoint.error = _error(getattr(exc, "reason", exc))
        return
    with contextlib.suppress(ValueError, AttributeError):
        endpoint.readiness = printable(str(json.loads(body)["status"]))


async def gather_status(settings: Settings, options: Options) -> Status:
    """Look at everything once (sampling the rates over options.sample_seconds)."""
    endpoints = [EndpointState("api", url) for url in options.apis] + [
        EndpointState("worker", url) for url in options.workers
    ]
    checked = await asyncio.gather(
        *(_check_node(url, settings, options.timeout) for url in broker_nodes(settings.amqp_url))
    )
    nodes = [state for state, _ in checked]
    connections = [connection for _, connection in checked if connection is not None]
    try:
        database = asyncio.create_task(_newest_stored_age(settings, options.timeout))
        health = asyncio.gather(*(_check_health(e, options.timeout) for e in endpoints))
        first_metrics = await asyncio.gather(*(_metrics(e, options.timeout) for e in endpoints))
        started = time.monotonic()
        names = _queues(settings)
        first = await _sample_queues(connections[0], names, options.timeout) if connections else []
        await asyncio.sleep(options.sample_seconds)
        second = await _sample_queues(connections[0], names, options.timeout) if connections else []
        last_metrics = await asyncio.gather(*(_metrics(e, options.timeout) for e in endpoints))
        elapsed = time.monotonic() - started
        queues = _queue_states(names, first, second, elapsed)
        _endpoint_rates(endpoints, first_metrics, last_metrics, elapsed)
        dead = next(q for q in queues if q.queue == DEAD_LETTER_QUEUE)
        dead_letters = (
            await _count_dead_letters(
                connections[0], dead.ready, options.dead_letter_limit, options.timeout
            )
            if dead.ready is not None and connections
            else DeadLetterState(note="scores.dead could not be read")
        )
        await health
        stored = await database
    finally:
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.close()
    status = Status(
        broker_nodes=nodes,
        database=stored,
        queues=queues,
        dead_letters=dead_letters,
        oldest_unstored=_oldest_unstored(queues, endpoints, stored),
        endpoints=endpoints,
    )
    age = status.oldest_unstored.age_seconds
    status.oldest_unstored.too_old = age is not None and age > options.max_age_seconds
    status.problems = problems(status, options.max_age_seconds)
    return status


def _queue_states(
    names: list[str], first: list[QueueState], second: list[QueueState], elapsed: float
) -> list[QueueState]:
    if not second:
        return [QueueState(name, error="no broker node reachable") for name in names]
    before = {state.queue: state for state in first}
    for state in second:
        earlier = before.get(state.queue)
        if earlier is not None and earlier.ready is not None and state.ready is not None:
            state.ready_change_per_second = round((state.ready - earlier.ready) / elapsed, 1)
    return second


def _endpoint_rates(
    endpoints: list[EndpointState],
    first: list[bytes | None],
    last: list[bytes | None],
    elapsed: float,
) -> None:
    for endpoint, before, after in zip(endpoints, first, last, strict=True):
        name = ACCEPTED_METRIC if endpoint.role == "api" else PERSISTED_METRIC
        if before is not None and after is not None:
            start, end = _metric(before, name), _metric(after, name)
            if start is not None and end is not None:
                endpoint.rate_per_second = round((end - start) / elapsed, 1)
        if endpoint.role == "worker" and after is not None:
            endpoint.held_messages = _metric(after, HELD_METRIC)


def _oldest_unstored(
    queues: list[QueueState], endpoints: list[EndpointState], database: Mapping[str, Any]
) -> OldestUnstored:
    persist = [q for q in queues if q.queue != DEAD_LETTER_QUEUE]
    unread = [q.queue for q in persist if q.ready is None]
    if unread:
        return OldestUnstored(None, f"unknown: {', '.join(unread)} could not be read")
    held = sum(e.held_messages or 0 for e in endpoints if e.role == "worker")
    if not any(q.ready for q in persist) and held == 0:
        where = f"{QUEUE} has no" if len(persist) == 1 else "no persist queue has a"
        seen = "and the workers named hold none" if endpoints else "(a worker's held messages "
        seen += "" if endpoints else "are seen with --worker)"
        return OldestUnstored(0.0, f"none waiting: {where} ready message {seen}")
    if len(persist) > 1:
        waiting = sum(q.ready or 0 for q in persist)
        return OldestUnstored(
            None,
            f"unknown: {waiting} message(s) wait in {len(persist)} queues, and with shards the "
            "newest stored score bounds nothing (a quiet shard's is stored before a busy "
            "one's backlog): see each queue's ready rate",
        )
    newest = database.get("newest_stored_age_seconds")
    if newest is None:
        why = "no score stored yet" if database.get("error") is None else database["error"]
        return OldestUnstored(None, f"unknown: scores are waiting, and {why}")
    return OldestUnstored(
        round(float(newest), 1),
        "at most the age of the newest stored score (scores.persist is first in, first out)",
    )


def problems(status: Status, max_age_seconds: float) -> list[str]:
    """What is wrong, one sentence each; none means `status` exits 0."""
    found = [
        f"broker node {node.node} unreachable: {node.error}"
        for node in status.broker_nodes
        if not node.reachable
    ]
    if not status.database["reachable"] or status.database["error"] is not None:
        found.append(f"database: {status.database['error']}")
    for queue in status.queues:
        if queue.error is not None:
            found.append(f"{queue.queue}: {queue.error}")
        elif queue.queue != DEAD_LETTER_QUEUE and queue.ready and not queue.consumers:
            found.append(f"{queue.queue} has {queue.ready} ready message(s) and no consumer")
        elif queue.queue == DEAD_LETTER_QUEUE and queue.ready:
            found.append(f"{DEAD_LETTER_QUEUE} holds {queue.ready} dead letter(s)")
    age = status.oldest_unstored.age_seconds
    if status.oldest_unstored.too_old:
        found.append(
            f"the oldest unstored score is up to {age:g} s old (--max-age {max_age_seconds:g})"
        )
    for endpoint in status.endpoints:
        if endpoint.error is not None:
            found.append(f"{endpoint.role} {endpoint.url} unreachable: {endpoint.error}")
        elif endpoint.healthz != 200 or endpoint.readyz != 200:
            found.append(
                f"{endpoint.role} {endpoint.url}: /healthz {endpoint.healthz}, "
                f"/readyz {endpoint.readyz} ({endpoint.readiness or 'no status'})"
            )
    return found


def _rate(value: float | None) -> str:
    return "?" if value is None else f"{value:+g}/s"


def render(status: Status) -> Table:
    """The status as one table: what, its state, the details."""
    table = Table(title="score-ingest status", title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("details")

    def row(what: str, good: bool, state: str, details: str = "") -> None:
        table.add_row(Text(what), Text(state, style="green" if good else "bold red"), Text(details))

    for node in status.broker_nodes:
        state = "reachable" if node.reachable else "DOWN"
        row(f"broker {node.node}", node.reachable, state, node.error or "")
    database = status.database
    row(
        "database",
        database["reachable"] and database["error"] is None,
        "reachable" if database["reachable"] else "DOWN",
        database["error"] or "",
    )
    for queue in status.queues:
        if queue.error is not None:
            row(f"queue {queue.queue}", False, "?", queue.error)
            continue
        stuck = queue.queue != DEAD_LETTER_QUEUE and bool(queue.ready) and not queue.consumers
        dead = queue.queue == DEAD_LETTER_QUEUE and bool(queue.ready)
        row(
            f"queue {queue.queue}",
            not (stuck or dead),
            f"{queue.ready} ready",
            f"{queue.consumers} consumer(s), ready {_rate(queue.ready_change_per_second)}",
        )
    letters = status.dead_letters
    reasons = ", ".join(f"{reason} {count}" for reason, count in (letters.by_reason or {}).items())
    total = "?" if letters.total is None else str(letters.total)
    row("dead letters", letters.total == 0, total, reasons or letters.note or "")
    oldest = status.oldest_unstored
    age = "?" if oldest.age_seconds is None else f"{oldest.age_seconds:g} s"
    row("oldest unstored score", not oldest.too_old, age, oldest.basis)
    for endpoint in status.endpoints:
        what = "accepted" if endpoint.role == "api" else "stored"
        if endpoint.error is not None:
            row(f"{endpoint.role} {endpoint.url}", False, "DOWN", endpoint.error)
            continue
        details = (
            f"/healthz {endpoint.healthz}, /readyz {endpoint.readyz}, "
            f"{what} {_rate(endpoint.rate_per_second)}"
        )
        if endpoint.held_messages is not None:
            details += f", holding {endpoint.held_messages:g}"
        row(
            f"{endpoint.role} {endpoint.url}",
            endpoint.healthz == 200 and endpoint.readyz == 200,
            endpoint.readiness or "?",
            details,
        )
    return table


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http:// or https:// address")
    return url.rstrip("/")


def status(
    api: Annotated[
        list[str] | None,
        typer.Option(help="An api's address, e.g. http://10.0.0.5:8000 (repeatable)"),
    ] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(help="A worker's health address, e.g. http://10.0.0.6:8001 (repeatable)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts")] = False,
    sample_seconds: Annotated[
        float, typer.Option(min=0.1, help="Seconds between the two samples the rates come from")
    ] = 1.0,
    dead_letters: Annotated[
        int,
        typer.Option(
            "--dead-letters",
            min=0,
            help="Read reasons only when scores.dead holds at most this many",
        ),
    ] = 1000,
    max_age: Annotated[
        float,
        typer.Option(
            min=0, help="Seconds the oldest unstored score may wait before it is a problem"
        ),
    ] = 60.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for each answer")] = 5.0,
) -> None:
    """Broker, database, queues, dead letters, the oldest unstored score, apis and workers.

    Exits 0 when nothing is wrong, 1 when something is (each problem is listed).
    """
    options = Options(
        apis=tuple(_http_url(url) for url in api or ()),
        workers=tuple(_http_url(url) for url in worker or ()),
        sample_seconds=sample_seconds,
        dead_letter_limit=dead_letters,
        max_age_seconds=max_age,
        timeout=timeout,
    )
    # Each unreachable node is reported in the table; the client library's own error lines
    # about it would only repeat that on stderr.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    found = asyncio.run(gather_status(get_settings(), options))
    if as_json:
        typer.echo(json.dumps(found.to_json(), indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(render(found))
        for problem in found.problems:
            console.print(Text(f"problem: {problem}", style="bold red"))
        console.print(Text("OK" if found.ok else f"{len(found.problems)} problem(s)"))
    raise typer.Exit(0 if found.ok else 1)
