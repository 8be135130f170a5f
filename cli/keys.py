"""`score-ingest keys`: create, list and revoke API keys."""

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from api.keys import KeyInfo, create_key, list_keys, revoke_key
from cli._db import with_connection

_TABLE = "api_keys"
app = typer.Typer(
    help="Manage API keys (stored hashed; a secret is shown once).", no_args_is_help=True
)


@app.command()
def create(
    entity: Annotated[str, typer.Option(help="Entity the key may write to")],
    project: Annotated[
        list[str] | None, typer.Option(help="Limit the key to this project (repeatable)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for the key")] = None,
) -> None:
    """Create a key; its secret is printed once, alone on the last line."""
    info, secret = with_connection(
        _TABLE, lambda conn: create_key(conn, entity, project or (), name)
    )
    scope = ", ".join(info.projects) if info.projects else "all projects"
    typer.echo(f"created key {info.key_id} for {info.entity} ({scope}); store the secret now:")
    typer.echo(secret)


def _render(found: list[KeyInfo]) -> Table:
    table = Table("key_id", "entity", "projects", "name", "created", "revoked")
    for key in found:
        table.add_row(
            key.key_id,
            key.entity,
            ", ".join(key.projects) if key.projects else "(all)",
            key.name or "",
            key.created_at.isoformat(timespec="seconds"),
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "",
        )
    return table


@app.command("list")
def list_(
    entity: Annotated[str | None, typer.Option(help="Only this entity's keys")] = None,
) -> None:
    """List keys (never their secrets)."""
    Console().print(_render(with_connection(_TABLE, lambda conn: list_keys(conn, entity))))


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, as `keys list` shows")],
) -> None:
    """Revoke a key; running APIs refuse it within AUTH_CACHE_TTL_SECONDS."""
    if not with_connection(_TABLE, lambda conn: revoke_key(conn, key_id)):
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
