"""`python -m chaos.run`: the whole service on a cluster of its own, each scenario's fault under
load, and the report (issue 15).

Builds, in a temporary directory: a RabbitMQ cluster of three nodes and a PostgreSQL pair
(TLS, verify-full), the schema and topology, an API key, two apis and two workers. The second
api and worker are given the broker nodes in another order, so that they start on another
node than the first. Then runs the scenarios in order, prints the table and writes the JSON.
Exit status 1 when a target was missed.

The processes' logs go to processes.log in the directory, which is kept when a target was
missed (and its path printed), removed otherwise.
"""

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar
from urllib.parse import quote

import asyncpg

from api.keys import create_key
from chaos.load import ENTITY, PROJECT
from chaos.postgres import PostgresPair
from chaos.rabbit import RabbitCluster
from chaos.report import ScenarioResult, print_report, write_json
from chaos.scenarios import BY_NAME, SCENARIOS, Harness, Holds, run_scenario
from shared.settings import Settings
from shared.topology import api_queue
from tests.support.processes import ApiProcess, CliProcess, api_process, worker_process

DEFAULT_DURATION_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 120.0
PROCESSES = 2
DEFAULT_HOLDS = Holds()

T = TypeVar("T")


def _rotated_amqp_url(cluster: RabbitCluster, first: int) -> str:
    """The cluster's URL with its nodes listed from node `first` on."""
    addresses = [cluster.node_address(i) for i in range(cluster.size)]
    rotated = addresses[first:] + addresses[:first]
    return cluster.amqp_url.replace(",".join(addresses), ",".join(rotated))


def _settings(cluster: RabbitCluster, pair: PostgresPair, first_node: int) -> Settings:
    # Every other setting is the default (or the environment's), as an operator would run it.
    database_url = (
        f"{pair.database_url()}&sslmode=verify-full&sslrootcert={quote(str(pair.ca_file()))}"
    )
    return Settings(
        amqp_url=_rotated_amqp_url(cluster, first_node % cluster.size), database_url=database_url
    )


async def _command(args: Sequence[str], settings: Settings, log: TextIO) -> None:
    """Run `score-ingest <args>` to its end; fail with its output unless it exits 0."""
    process = CliProcess(" ".join(args), args, settings)
    async with _logged(process, log):
        if await process.wait(COMMAND_TIMEOUT_SECONDS) != 0:
            raise process.failure("failed")


@contextlib.asynccontextmanager
async def _logged(
    context: contextlib.AbstractAsyncContextManager[T], log: TextIO
) -> AsyncIterator[T]:
    """Enter a process's context; its output, printed on the way out, goes to log."""
    async with contextlib.AsyncExitStack() as stack:
        value = await stack.enter_async_context(context)
        try:
            yield value
        finally:
            with contextlib.redirect_stdout(log):
                await stack.aclose()


async def _api_key(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        _, secret = await create_key(conn, ENTITY, [PROJECT], name="chaos")
    finally:
        await conn.close()
    return secret


class _Say:
    """Progress lines, with the seconds since the run began."""

    def __init__(self, started: float) -> None:
        self._started = started

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f} s] {line}", flush=True)


async def run_chaos(
    seed: int,
    duration: float,
    names: Sequence[str],
    workdir: Path,
    cluster: RabbitCluster | None = None,
    holds: Holds = DEFAULT_HOLDS,
) -> list[ScenarioResult]:
    """Build the service in workdir, on a RabbitMQ cluster of its own unless given a running
    one (healthy, its queues empty), run the named scenarios, return results."""
    say = _Say(time.monotonic())
    pair = PostgresPair(workdir / "postgres")
    with contextlib.ExitStack() as nodes, (workdir / "processes.log").open("w") as log:
        nodes.callback(pair.close)
        starting = [asyncio.to_thread(pair.start)]
        if cluster is None:
            cluster = RabbitCluster(workdir / "rabbit")
            nodes.callback(cluster.close)
            starting.append(asyncio.to_thread(cluster.start))
            say("starting 3 RabbitMQ nodes and a PostgreSQL pair")
        else:
            say("starting a PostgreSQL pair, on the RabbitMQ cluster given")
        await asyncio.gather(*starting)
        settings = [_settings(cluster, pair, k) for k in range(PROCESSES)]
        await _command(["migrate"], settings[0], log)
        await _command(["topology"], settings[0], log)
        api_key = await _api_key(settings[0].database_url)
        async with contextlib.AsyncExitStack() as processes:
            apis: list[ApiProcess] = [
                await processes.enter_async_context(_logged(api_process(each), log))
                for each in settings
            ]

            async def start_worker(k: int) -> CliProcess:
                return await processes.enter_async_context(
                    _logged(worker_process(settings[k]), log)
                )

            workers = [await start_worker(k) for k in range(PROCESSES)]
            harness = Harness(
                cluster=cluster,
                pair=pair,
                apis=apis,
                workers=workers,
                start_worker=start_worker,
                api_key=api_key,
                seed=seed,
                database_url=settings[0].database_url,
                log=say,
                holds=holds,
                load_queue=api_queue(ENTITY, PROJECT, settings[0].queue_shards),
            )
            say(f"running {', '.join(names)} with seed {seed}, {duration} s each")
            results = []
            for name in names:
                results.append(await run_scenario(harness, BY_NAME[name], duration))
                say(f"{name}: {'; '.join(results[-1].failures) or 'targets met'}")
            return results


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.run", description="Faults under load on a cluster of real nodes."
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Chooses each fault's node and moment (random)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_SECONDS,
        help=f"Seconds of load per scenario (default {DEFAULT_DURATION_SECONDS:g})",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[scenario.name for scenario in SCENARIOS],
        help="Run only this scenario (repeatable; default: all, in order)",
    )
    parser.add_argument("--json", type=Path, default=None, help="Write the report here too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos run the arguments ask for; 0 when every target was met."""
    args = _arguments(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    names = args.scenario or [scenario.name for scenario in SCENARIOS]
    print(f"chaos run, seed {seed} (repeat it with --seed {seed})", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="score-ingest-chaos-"))
    workdir.chmod(0o755)  # the PostgreSQL servers run as user postgres
    try:
        results = asyncio.run(run_chaos(seed, args.duration, names, workdir))
    except BaseException:
        print(f"the run failed; process logs: {workdir / 'processes.log'}", file=sys.stderr)
        raise
    print_report(results)
    json_path = args.json or Path(tempfile.gettempdir()) / f"score-ingest-chaos-{seed}.json"
    write_json(json_path, results, seed=seed, duration=args.duration)
    print(f"report: {json_path}")
    passed = all(not result.failures for result in results)
    if passed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"targets missed; process logs: {workdir / 'processes.log'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
