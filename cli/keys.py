"""`score-ingest keys`: create, list, revoke API keys, and set the quotas of keys and entities."""

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from api.keys import KeyInfo, create_key, list_keys, revoke_key, set_key_quota
from api.quotas import Quota, entity_quota, set_entity_quota
from cli._db import with_connection

_TABLE = "api_keys"
_ENTITY_QUOTAS_TABLE = "entity_quotas"
_TAKES_EFFECT = "running apis apply it within AUTH_CACHE_TTL_SECONDS"
_PIPED_WIDTH = 160
app = typer.Typer(
    help="Manage API keys (stored hashed; a secret is shown once).", no_args_is_help=True
)


RateOption = Annotated[
    int | None,
    typer.Option(min=1, help="Quota: scores per second (every score of a batch counts)"),
]
BurstOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Quota: most scores at once (needs --rate); default the rate or 1000, the larger",
    ),
]


def _quota(rate: int | None, burst: int | None) -> Quota | None:
    if rate is None:
        if burst is not None:
            raise typer.BadParameter("--burst needs --rate")
        return None
    return Quota.of(rate, burst)


@app.command()
def create(
    entity: Annotated[str, typer.Option(help="Entity the key may write to")],
    project: Annotated[
        list[str] | None, typer.Option(help="Limit the key to this project (repeatable)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for the key")] = None,
    rate: RateOption = None,
    burst: BurstOption = None,
) -> None:
    """Create a key (with a quota of its own, or QUOTA_KEY_*); its secret is printed once,
    alone on the last line."""
    quota = _quota(rate, burst)
    info, secret = with_connection(
        _TABLE, lambda conn: create_key(conn, entity, project or (), name, quota)
    )
    scope = ", ".join(info.projects) if info.projects else "all projects"
    quoted = f"; quota {quota}" if quota else ""
    typer.echo(
        f"created key {info.key_id} for {info.entity} ({scope}){quoted}; store the secret now:"
    )
    typer.echo(secret)


@app.command()
def update(
    key_id: Annotated[str, typer.Argument(help="The key's id, as `keys list` shows")],
    rate: RateOption = None,
    burst: BurstOption = None,
    clear_quota: Annotated[
        bool, typer.Option("--clear-quota", help="Back to the default quota (QUOTA_KEY_*)")
    ] = False,
) -> None:
    """Set a key's quota, or clear it; running apis apply it within AUTH_CACHE_TTL_SECONDS."""
    quota = _quota(rate, burst)
    if (quota is None) != clear_quota:
        raise typer.BadParameter("give either --rate (and --burst) or --clear-quota")
    if not with_connection(_TABLE, lambda conn: set_key_quota(conn, key_id, quota)):
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id}: quota {quota or 'default'}; {_TAKES_EFFECT}")


@app.command("entity-quota")
def entity_quota_(
    entity: Annotated[str, typer.Argument(help="The entity whose keys share the quota")],
    rate: RateOption = None,
    burst: BurstOption = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Back to the default quota (QUOTA_ENTITY_*)")
    ] = False,
) -> None:
    """Show, set or clear the quota all of an entity's keys share."""
    quota = _quota(rate, burst)
    if quota is not None and clear:
        raise typer.BadParameter("give either --rate (and --burst) or --clear")
    if quota is None and not clear:
        found = with_connection(_ENTITY_QUOTAS_TABLE, lambda conn: entity_quota(conn, entity))
        typer.echo(f"entity {entity}: quota {found or 'default (QUOTA_ENTITY_*)'}")
        return
    with_connection(_ENTITY_QUOTAS_TABLE, lambda conn: set_entity_quota(conn, entity, quota))
    typer.echo(f"entity {entity}: quota {quota or 'default'}; {_TAKES_EFFECT}")


def _render(found: list[KeyInfo]) -> Table:
    table = Table(
        Column("key_id", no_wrap=True), "entity", "projects", "name", "quota", "created", "revoked"
    )
    for key in found:
        table.add_row(
            key.key_id,
            key.entity,
            ", ".join(key.projects) if key.projects else "(all)",
            key.name or "",
            str(key.quota) if key.quota else "(default)",
            key.created_at.isoformat(timespec="seconds"),
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "",
        )
    return table


@app.command("list")
def list_(
    entity: Annotated[str | None, typer.Option(help="Only this entity's keys")] = None,
) -> None:
    """List keys (never their secrets)."""
    console = Console()
    if not console.is_terminal:
        # Piped or to a file: no window to fit, and an id cut to fit 80 columns is useless.
        console.width = _PIPED_WIDTH
    console.print(_render(with_connection(_TABLE, lambda conn: list_keys(conn, entity))))


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, as `keys list` shows")],
) -> None:
    """Revoke a key; running APIs refuse it within AUTH_CACHE_TTL_SECONDS."""
    if not with_connection(_TABLE, lambda conn: revoke_key(conn, key_id)):
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
