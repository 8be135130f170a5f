"""Running one piece of work on a PostgreSQL connection, for the commands that manage tables."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import typer

from shared.settings import get_settings

T = TypeVar("T")


def with_connection(table: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run work on a connection to DATABASE_URL; a missing table says to migrate first."""

    async def run() -> T:
        try:
            conn = await asyncpg.connect(get_settings().database_url)
        except asyncpg.InvalidCatalogNameError:
            message = "the database does not exist: run `score-ingest migrate` first"
            raise typer.BadParameter(message) from None
        try:
            return await work(conn)
        except asyncpg.UndefinedTableError:
            raise typer.BadParameter(
                f"no {table} table: run `score-ingest migrate` first"
            ) from None
        finally:
            await conn.close()

    return asyncio.run(run())
