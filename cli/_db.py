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
        conn = await asyncpg.connect(get_settings().database_url)
        try:
            return await work(conn)
        except asyncpg.UndefinedTableError:
            raise typer.BadParameter(
                f"no {table} table: run `score-ingest migrate` first"
            ) from None
        finally:
            await conn.close()

    return asyncio.run(run())
