"""W&B's Weave SDK drives a running api and worker: create and read back at once, list
(filtered, paged), delete.

The SDK is imported by the tests, not by the module: importing it takes 0.7 s of CPU, which
every pytest process that collects this module would spend, whether it runs these or not.
"""

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import pytest

from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT
from tests.support.processes import api_process, worker_process

if TYPE_CHECKING:
    from weave.trace_server_bindings.remote_http_trace_server import RemoteHTTPTraceServer

PROJECT_ID = f"{ENTITY}/{PROJECT}"
SCORER = f"weave:///{ENTITY}/{PROJECT}/op/exact_match:abc123"
RUNS = ["run-a", "run-b", "run-a", "run-b", "run-a"]
COUNT_PROJECT_SCORES = "SELECT count(*) FROM scores WHERE entity = $1 AND project = $2"

T = TypeVar("T")


async def _sdk(call: Callable[[Mapping[str, Any]], T], **request: Any) -> T:
    """Run one blocking SDK call off the event loop, which keeps serving the subprocesses."""
    return await asyncio.to_thread(call, {"project_id": PROJECT_ID, **request})


async def _list_ids(server: "RemoteHTTPTraceServer", **request: Any) -> list[str]:
    listed = await asyncio.to_thread(
        lambda: list(server.score_list({"project_id": PROJECT_ID, **request}))
    )
    return [score.score_id for score in listed]


def test_the_sdk_sends_no_error_reports() -> None:
    from weave.telemetry import trace_sentry

    # tests/e2e/conftest.py turns reporting off; with it on, the SDK has a Sentry scope.
    assert trace_sentry.global_trace_sentry.scope is None


async def test_create_read_list_and_delete_through_the_weave_sdk(
    settings: Settings, api_key: str, db: asyncpg.Connection
) -> None:
    from weave.trace_server_bindings.remote_http_trace_server import RemoteHTTPTraceServer
    from weave.vendor.weave_server_sdk import NotFoundError

    key_id = api_key.split("_")[1]
    async with worker_process(settings), api_process(settings) as api:
        server = RemoteHTTPTraceServer(api.base_url, password=api_key)

        ids = []
        for i, run in enumerate(RUNS):
            value = {"correct": i % 2 == 0, "score": i / 4}
            created = await _sdk(
                server.score_create,
                prediction_id=f"prediction-{i}",
                scorer=SCORER,
                value=value,
                evaluation_run_id=run,
            )
            # Read back at once, with no sleep: the read waits for the worker to store it.
            read = await _sdk(server.score_read, score_id=created.score_id)
            assert read.score_id == created.score_id
            assert read.scorer == SCORER
            assert read.value == value
            assert read.evaluation_run_id == run
            assert read.wb_user_id == key_id
            ids.append(created.score_id)
        assert len(set(ids)) == len(RUNS)
        assert await db.fetchval(COUNT_PROJECT_SCORES, ENTITY, PROJECT) == len(ids)

        assert await _list_ids(server) == ids
        assert await _list_ids(server, evaluation_run_id="run-a") == [ids[0], ids[2], ids[4]]
        assert await _list_ids(server, evaluation_run_id="run-b") == [ids[1], ids[3]]
        pages = [await _list_ids(server, limit=2, offset=offset) for offset in (0, 2, 4, 6)]
        assert pages == [ids[0:2], ids[2:4], ids[4:5], []]
        filtered_pages = [
            await _list_ids(server, evaluation_run_id="run-a", limit=2, offset=offset)
            for offset in (0, 2)
        ]
        assert filtered_pages == [[ids[0], ids[2]], [ids[4]]]

        deleted = await _sdk(server.score_delete, score_ids=[ids[2]])
        assert deleted.num_deleted == 1

        with pytest.raises(NotFoundError):
            await _sdk(server.score_read, score_id=ids[2])
        remaining = [ids[0], ids[1], ids[3], ids[4]]
        assert await _list_ids(server) == remaining
        assert await _list_ids(server, evaluation_run_id="run-a") == [ids[0], ids[4]]
        assert (await _sdk(server.score_delete, score_ids=[ids[2]])).num_deleted == 0
        assert (await _sdk(server.score_read, score_id=ids[4])).score_id == ids[4]
