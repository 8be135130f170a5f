"""The `score-ingest` command: run the api and the worker, migrate, declare, manage keys."""

import asyncio
import contextlib
import ctypes
import gc
import json
import math
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from cli import dlq, keys, status
from shared.contract import BATCH_MESSAGE_TYPE, MESSAGE_TYPE, message_json_schema
from shared.db import migrate as apply_migrations
from shared.logs import configure_logging
from shared.settings import get_settings
from shared.topology import declare_topology_once

app = typer.Typer(
    help="score-ingest: durable ingestion of Weave scores. Settings come from the environment.",
    no_args_is_help=True,
)
app.add_typer(keys.app, name="keys")
app.add_typer(dlq.app, name="dlq")
app.command()(status.status)


@app.callback()
def _setup() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface to bind (API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (API_PORT)")] = None,
    root_path: Annotated[
        str | None,
        typer.Option(help="Path prefix a proxy serves the api under and strips (API_ROOT_PATH)"),
    ] = None,
) -> None:
    """Serve the HTTP API."""
    # Imported here, not at the top: without FastAPI, the app and uvicorn the other
    # commands (dlq, keys, status) import in 0.35 s instead of 0.41 s. bench.serve swaps
    # api.app.create_app, which this import then finds.
    import uvicorn

    from api.app import create_app
    from api.http_server import ConnectionLimits, http_protocol

    settings = get_settings()
    application = create_app(settings)
    _spare_the_collector()
    _return_freed_buffers()
    uvicorn.run(
        application,
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        root_path=settings.api_root_path if root_path is None else root_path,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=math.ceil(settings.publish_timeout_seconds) + 1,
        # Our protocol: uvicorn's httptools one with header and body deadlines, a header
        # size limit and a bound on connections (api/http_server.py).
        http=http_protocol(ConnectionLimits.from_settings(settings)),
        # The api has no WebSocket routes; an upgrade would leave the protocol's limits.
        ws="none",
        # Nothing reads the client's address, so X-Forwarded-* is not rewritten into it
        # (uvicorn would, for every request from a trusted address).
        proxy_headers=False,
        # No `server: uvicorn` on every answer: it tells an attacker what to look up, and
        # costs each response a header.
        server_header=False,
    )


@app.command()
def worker() -> None:
    """Consume scores.persist and store scores in PostgreSQL."""
    import uvloop

    from worker.worker import run_worker

    settings = get_settings()
    _spare_the_collector()
    _return_freed_buffers()
    uvloop.run(run_worker(settings))


def _spare_the_collector() -> None:
    """Move what the process holds before it serves (modules, pydantic's and FastAPI's
    schemas, the app) to the collector's permanent generation: it lives as long as the
    process, and every full collection would walk it again, about 78,000 objects. In
    interleaved A/B runs (BENCHMARKS.md) the worker drained batch messages about 12 %
    faster and the api accepted batches about 25 % faster."""
    gc.freeze()


# glibc's M_MMAP_THRESHOLD, from <malloc.h>.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 256 * 1024


def _return_freed_buffers() -> None:
    """Give every buffer of 256 KiB or more its own mapping, returned to the system when freed.

    glibc raises its mmap threshold to the size of each large block freed, up to 32 MiB:
    after one 15 MiB message, later ones are carved from the heap, which is rarely given
    back, and resident memory drifts far above what is live. With the threshold fixed, the
    worker's peak in the hostile run (tests/test_hostile_run.py) fell from 152-191 MB to
    111-137 MB and the api's from 164-183 MB to 124-157 MB. A no-op where libc has no
    mallopt (macOS); musl ignores it.
    """
    if sys.platform == "linux":
        with contextlib.suppress(AttributeError):
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


@app.command()
def migrate() -> None:
    """Create the database if missing and apply pending migrations."""
    applied = asyncio.run(apply_migrations(get_settings().database_url))
    typer.echo(f"applied migrations: {applied}" if applied else "schema is up to date")


@app.command()
def topology() -> None:
    """Declare the exchanges, queues and bindings (idempotent)."""
    asyncio.run(declare_topology_once(get_settings(), connect_timeout=10))
    typer.echo("topology declared")


@app.command()
def schema(
    batch: Annotated[
        bool, typer.Option("--batch", help=f"The {BATCH_MESSAGE_TYPE} message instead")
    ] = False,
) -> None:
    """Print the JSON Schema of the score message (or of the batch message)."""
    message_type = BATCH_MESSAGE_TYPE if batch else MESSAGE_TYPE
    typer.echo(json.dumps(message_json_schema(message_type), indent=2))


def _die_with_parent() -> None:
    """In a child of `run`: get SIGTERM when `run` dies, even of SIGKILL (Linux only)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@app.command()
def run() -> None:
    """Migrate, declare the topology, then run the api and a worker until interrupted."""
    migrate()
    topology()
    # Own sessions: a terminal's Ctrl-C reaches only us, and we pass it on exactly once.
    children = [
        subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "cli", role],
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        for role in ("api", "worker")
    ]

    def stop(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Whichever child exits first takes the other down with it.
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    stop(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    # uvicorn re-raises the stop signal after a clean shutdown, so dying of it is a clean exit.
    failed = [code for code in codes if code not in (0, -signal.SIGINT, -signal.SIGTERM)]
    raise typer.Exit(failed[0] if failed else 0)
