"""`python -m cli` is the `score-ingest` command."""

from cli.main import app

app()
