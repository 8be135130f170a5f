"""What the cluster tests share: a PostgreSQL pair of the test's own."""

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.postgres import PostgresPair


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    """A primary and a streaming standby with TLS, in a directory user postgres can reach
    (pytest's tmp_path is not): a new pair for each test, which may fail it over."""
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-pg-"))
    try:
        started = time.monotonic()
        with PostgresPair(workdir) as running:
            print(f"PostgreSQL pair started in {time.monotonic() - started:.2f}s")
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
