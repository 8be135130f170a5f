"""`score-ingest signing-keys`: list and rotate the keys the api signs its messages with."""

import typer
from rich.console import Console
from rich.table import Table

from cli._db import with_connection
from shared.signing import KEYS_KEPT, REFRESH_SECONDS, list_keys, rotate

_TABLE = "message_signing_keys"
app = typer.Typer(
    help="Keys that let workers skip validating what the api validated (secrets never shown).",
    no_args_is_help=True,
)


@app.command("list")
def list_() -> None:
    """List the keys, newest first: apis sign with the newest, workers accept each."""
    table = Table("key_id", "created")
    for key_id, created_at in with_connection(_TABLE, list_keys):
        table.add_row(key_id, created_at.isoformat(timespec="seconds"))
    Console().print(table)


@app.command("rotate")
def rotate_() -> None:
    """Add a new key and drop all but the one before it."""
    key = with_connection(_TABLE, rotate)
    typer.echo(
        f"added {key.key_id}; apis sign with it and workers accept it within "
        f"{REFRESH_SECONDS:g}s, and {KEYS_KEPT} keys are kept. Messages signed with a "
        "dropped key are validated in full, never refused."
    )
