"""PostgreSQL set-up both sides need: creating the database and applying migrations."""

import logging
from dataclasses import dataclass
from importlib import resources
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# What makes the database unreachable, as opposed to a bug in our SQL or bad data. During a
# failover the server that takes writes is briefly missing: a multi-host DATABASE_URL with
# target_session_attrs=read-write then finds only standbys (TargetServerAttributeNotMatched),
# and a session on a server that no longer takes writes has its writes refused
# (ReadOnlySQLTransactionError). Both pass once a primary is back, as a lost connection does.
DATABASE_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.TargetServerAttributeNotMatched,
    asyncpg.ReadOnlySQLTransactionError,
)

# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_KEY = 0x5C0BE1
_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_APPLIED_VERSIONS = "SELECT version FROM schema_migrations"
_RECORD_MIGRATION = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"
_DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = $1"


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file from shared/migrations."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def database_name(url: str) -> str:
    """The database named in a postgresql:// URL (one host or several: `h1:p1,h2:p2`)."""
    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name:
        raise ValueError(f"DATABASE_URL names no database: {url!r}")
    return name


def with_database(url: str, name: str) -> str:
    """The same servers and options (sslmode, target_session_attrs, ...) pointing at another
    database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database_if_missing(url: str) -> bool:
    """Create the database named in url unless it exists; True when this call created it."""
    name = database_name(url)
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        if await conn.fetchval(_DATABASE_EXISTS, name):
            return False
        try:
            await conn.execute(f"CREATE DATABASE {_quote_identifier(name)}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            return False  # another process created it between our check and our CREATE
        log.info("created database %s", name)
        return True
    finally:
        await conn.close()


async def migrate(url: str) -> list[int]:
    """Create the database if needed and apply pending migrations; returns versions applied."""
    await create_database_if_missing(url)
    conn = await asyncpg.connect(url)
    try:
        # The advisory lock makes concurrent migrate runs take turns instead of racing.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_CREATE_MIGRATIONS_TABLE)
            applied = {row["version"] for row in await conn.fetch(_APPLIED_VERSIONS)}
            done = []
            for migration in load_migrations():
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(_RECORD_MIGRATION, migration.version, migration.name)
                log.info("applied migration %04d_%s", migration.version, migration.name)
                done.append(migration.version)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
