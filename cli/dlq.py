"""`score-ingest dlq`: inspect, export, replay and purge dead letters."""

import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, TextIO

import typer
from aio_pika.abc import AbstractIncomingMessage
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from cli._dead_letters import DeadLetter, DeadLetterQueue, Filter, open_dead_letters, printable
from shared.settings import get_settings

app = typer.Typer(help="Inspect and act on dead letters in scores.dead.", no_args_is_help=True)


def _console() -> Console:
    """Messages and progress go to stderr. Made when a command runs, not at import: Rich
    reads the environment (COLUMNS, NO_COLOR) when a Console is made."""
    return Console(stderr=True)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 10m, 2h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


ReasonOpt = Annotated[str | None, typer.Option(help="Only this x-dead-letter-reason")]
EntityOpt = Annotated[str | None, typer.Option(help="Only scores of this entity")]
ProjectOpt = Annotated[str | None, typer.Option(help="Only scores of this project")]
OlderOpt = Annotated[
    str | None, typer.Option(help="Only dead-lettered at least this long ago (30s, 10m, 2h, 7d)")
]
NewerOpt = Annotated[str | None, typer.Option(help="Only dead-lettered at most this long ago")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Act on at most this many")]
IdOpt = Annotated[
    str | None,
    typer.Option(
        "--id",
        help="Only the dead letter with this id (as `dlq list` shows it): the first one "
        "found, unless --limit says more; every other letter stays, in order",
    ),
]


def _filter(
    reason: str | None,
    entity: str | None,
    project: str | None,
    older_than: str | None,
    newer_than: str | None,
    dead_letter_id: str | None = None,
) -> Filter:
    return Filter(
        reason=reason,
        entity=entity,
        project=project,
        older_than=_duration(older_than) if older_than else None,
        newer_than=_duration(newer_than) if newer_than else None,
        id=dead_letter_id,
    )


def _limit(limit: int | None, dead_letter_id: str | None) -> int | None:
    """An id names one letter: unless told otherwise, only the first with it is acted on."""
    return 1 if limit is None and dead_letter_id is not None else limit


Action = Callable[[AbstractIncomingMessage, DeadLetter], Awaitable[None]]


async def _pass(
    selection: Filter,
    limit: int | None,
    act: Callable[[DeadLetterQueue], Action],
    description: str,
) -> int:
    """Run act on each matching dead letter with a progress bar; returns how many."""
    done = 0
    async with open_dead_letters(get_settings()) as dead:
        action = act(dead)
        with Progress(console=_console(), transient=True) as progress:
            task = progress.add_task(description, total=dead.total)
            async for message, letter in dead.browse(
                selection, limit, lambda: progress.advance(task)
            ):
                await action(message, letter)
                done += 1
    return done


def _collector(
    keep: Callable[[DeadLetter], None],
) -> Callable[[DeadLetterQueue], Action]:
    """An action that hands each dead letter to keep and removes nothing."""

    def act(_: DeadLetterQueue) -> Action:
        async def collect(_message: AbstractIncomingMessage, letter: DeadLetter) -> None:
            keep(letter)

        return collect

    return act


def _age(letter: DeadLetter, now: datetime) -> str:
    age = letter.age(now)
    return "?" if age is None else str(timedelta(seconds=int(age.total_seconds())))


def _row(letter: DeadLetter, now: datetime) -> tuple[Text, ...]:
    """A table row; Text, so that nothing a publisher wrote is read as console markup."""
    cells = (
        letter.id,
        printable(letter.reason),
        _age(letter, now),
        f"{printable(letter.entity or '?')}/{printable(letter.project or '?')}",
        str(letter.size),
        printable(letter.detail)[:80],
    )
    return tuple(Text(cell) for cell in cells)


@app.command("list")
def list_(
    reason: ReasonOpt = None,
    entity: EntityOpt = None,
    project: ProjectOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    limit: LimitOpt = None,
    dead_letter_id: IdOpt = None,
) -> None:
    """A table of dead letters: id, reason, age, entity/project, size. Nothing is removed."""
    # Rows, not letters, are kept: a pass over many large bodies must not hold them all.
    rows: list[tuple[Text, ...]] = []
    now = datetime.now(UTC)
    selection = _filter(reason, entity, project, older_than, newer_than, dead_letter_id)
    asyncio.run(
        _pass(
            selection,
            _limit(limit, dead_letter_id),
            _collector(lambda letter: rows.append(_row(letter, now))),
            "reading",
        )
    )
    table = Table()
    for column in ("id", "reason", "age", "entity/project", "size"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="ellipsis", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # Piped output gets a wide console, so ids are never cut (they feed `dlq show`).
    Console(width=None if sys.stdout.isatty() else 250).print(table)
    _console().print(f"{len(rows)} dead letter(s)")


@app.command()
def show(dead_letter_id: Annotated[str, typer.Argument(help="An id from `dlq list`")]) -> None:
    """Headers and body of one dead letter, as JSON. Nothing is removed."""
    found: list[DeadLetter] = []
    asyncio.run(_pass(Filter(id=dead_letter_id), 1, _collector(found.append), "searching"))
    if not found:
        _console().print(f"no dead letter {printable(dead_letter_id)}", markup=False)
        raise typer.Exit(1)
    typer.echo(json.dumps(found[0].to_json(escaped_body=True), indent=2))


def _writer(out: TextIO) -> Callable[[DeadLetterQueue], Action]:
    def act(_: DeadLetterQueue) -> Action:
        async def write(_message: AbstractIncomingMessage, letter: DeadLetter) -> None:
            out.write(json.dumps(letter.to_json()) + "\n")

        return write

    return act


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="JSON Lines file to write (- for stdout)")],
    reason: ReasonOpt = None,
    entity: EntityOpt = None,
    project: ProjectOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    limit: LimitOpt = None,
    dead_letter_id: IdOpt = None,
) -> None:
    """Write dead letters to a JSON Lines file, one object each. Nothing is removed."""
    selection = _filter(reason, entity, project, older_than, newer_than, dead_letter_id)
    limit = _limit(limit, dead_letter_id)
    if str(file) == "-":
        count = asyncio.run(
            _pass(selection, limit, _writer(typer.get_text_stream("stdout")), "exporting")
        )
    else:
        with file.open("w") as out:
            count = asyncio.run(_pass(selection, limit, _writer(out), "exporting"))
    _console().print(f"exported {count} dead letter(s)")


@app.command()
def replay(
    reason: ReasonOpt = None,
    entity: EntityOpt = None,
    project: ProjectOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    limit: LimitOpt = None,
    dead_letter_id: IdOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be replayed")
    ] = False,
) -> None:
    """Re-publish dead letters to `scores`; each is removed once its copy is confirmed."""

    def act(dead: DeadLetterQueue) -> Action:
        async def count_only(_message: AbstractIncomingMessage, _letter: DeadLetter) -> None:
            return None

        return count_only if dry_run else dead.replay

    selection = _filter(reason, entity, project, older_than, newer_than, dead_letter_id)
    count = asyncio.run(_pass(selection, _limit(limit, dead_letter_id), act, "replaying"))
    _console().print(f"{'would replay' if dry_run else 'replayed'} {count} dead letter(s)")


@app.command()
def purge(
    reason: ReasonOpt = None,
    entity: EntityOpt = None,
    project: ProjectOpt = None,
    older_than: OlderOpt = None,
    newer_than: NewerOpt = None,
    limit: LimitOpt = None,
    dead_letter_id: IdOpt = None,
    export_to: Annotated[
        Path | None, typer.Option("--export", help="First append each to this JSON Lines file")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Remove dead letters for good (after writing them to --export, if given)."""
    if not yes:
        typer.confirm("Remove the matching dead letters for good?", abort=True)
    selection = _filter(reason, entity, project, older_than, newer_than, dead_letter_id)
    out = export_to.open("a") if export_to else None

    def act(_: DeadLetterQueue) -> Action:
        async def remove(message: AbstractIncomingMessage, letter: DeadLetter) -> None:
            if out is not None:
                out.write(json.dumps(letter.to_json()) + "\n")
                out.flush()
                os.fsync(out.fileno())  # on disk before the dead letter is gone
            await message.ack()

        return remove

    try:
        count = asyncio.run(_pass(selection, _limit(limit, dead_letter_id), act, "purging"))
    finally:
        if out is not None:
            out.close()
    _console().print(f"purged {count} dead letter(s)")
