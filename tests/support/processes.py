"""Running score-ingest as the tests' subjects: CLI subprocesses, in-process workers, the broker.

Subprocesses get their settings as environment variables, exactly as in production, and are
always killed on the way out of their context manager, whatever the test did. Their output is
kept and printed on the way out, so a failing test shows what the process said.
"""

import asyncio
import codecs
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from fastapi import FastAPI

from shared.broker import BrokerNodes, connect_to_a_node
from shared.contract import ScoreMessage
from shared.ids import new_score_id
from shared.settings import Settings
from shared.topology import (
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    QUEUE,
    ROUTING_KEY,
    declare_topology,
)
from tests.conftest import ENTITY, PROJECT, client_for, running_app
from tests.support import cli_child
from tests.support.messages import to_amqp_message
from tests.support.services import free_port
from worker.worker import ScoreWorker

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_READY_LINE = "worker consuming"
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 15.0
CLI_TIMEOUT_SECONDS = 60.0
_OUTPUT_CHUNK_BYTES = 65536


class ProcessFailed(AssertionError):
    """A subprocess did not do what the test waited for; the message carries its output."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a CLI process needs to read exactly these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None:  # unset: the setting's default
            env[name.upper()] = str(value)
    return env


# One fork server per test process, started on first use (tests/support/cli_child.py).
_FORK_SERVER = multiprocessing.get_context("forkserver")
_FORK_SERVER.set_forkserver_preload([cli_child.__name__])


class CliChild:
    """`python -m cli <args>`, forked by start_cli: what the tests use of an asyncio subprocess."""

    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader | None,
        stdin: int | None,
    ) -> None:
        self._process = process
        self.stdout = stdout
        self.stderr = stderr
        self._stdin = stdin

    @property
    def pid(self) -> int:
        """The child's process id."""
        pid = self._process.pid
        assert pid is not None
        return pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        """Send a signal to the child, unless it has exited (its pid may be another's now)."""
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the child."""
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the child to exit; its exit code."""
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            exited = asyncio.Event()
            sentinel = self._process.sentinel
            loop.add_reader(sentinel, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(sentinel)
        self._process.join()
        code = self._process.exitcode
        assert code is not None
        return code

    async def communicate(self, stdin: bytes | None = None) -> tuple[bytes, bytes]:
        """Write stdin (then close it), read stdout and stderr to their ends, wait for the exit."""
        if self._stdin is not None:
            await asyncio.to_thread(_write_and_close, self._stdin, stdin or b"")
            self._stdin = None
        assert self.stderr is not None, "stderr goes into stdout"
        out, err, _ = await asyncio.gather(self.stdout.read(), self.stderr.read(), self.wait())
        return out, err


async def start_cli(
    args: Sequence[str],
    env: dict[str, str],
    *,
    stdin: bool = False,
    stderr_into_stdout: bool = False,
) -> CliChild:
    """Start `python -m cli args` with exactly this environment, in the repository's root,
    in a session of its own; stdin a pipe (else /dev/null), stdout and stderr pipes.

    Forked from a server that has imported the CLI (tests/support/cli_child.py): the same
    process `python -m cli` is, for a tenth of its CPU."""
    loop = asyncio.get_running_loop()
    child_ends: list[Connection] = []
    readers: list[asyncio.StreamReader] = []
    for _ in range(1 if stderr_into_stdout else 2):
        read_end, write_end = os.pipe()
        child_ends.append(Connection(write_end, readable=False))
        reader = asyncio.StreamReader(limit=_OUTPUT_CHUNK_BYTES)
        await loop.connect_read_pipe(
            partial(asyncio.StreamReaderProtocol, reader),
            open(read_end, "rb", buffering=0),  # noqa: SIM115  (the transport closes it)
        )
        readers.append(reader)
    stdin_end: Connection | None = None
    stdin_writer: int | None = None
    if stdin:
        read_end, stdin_writer = os.pipe()
        stdin_end = Connection(read_end, writable=False)
    process = _FORK_SERVER.Process(
        target=cli_child.become_cli,
        args=(
            list(args),
            env,
            str(REPO_ROOT),
            stdin_end,
            child_ends[0],
            child_ends[1] if len(child_ends) > 1 else None,
        ),
        daemon=True,
    )
    try:
        # In a thread: the first start of a test process waits for the server's imports.
        await asyncio.to_thread(process.start)
    finally:
        # The child has its own copies now; ours would keep the pipes open after it exits.
        for end in (*child_ends, stdin_end):
            if end is not None:
                end.close()
    return CliChild(process, readers[0], readers[1] if len(readers) > 1 else None, stdin_writer)


def _write_and_close(fd: int, data: bytes) -> None:
    """Write all of data to the pipe, unless the child closed its end first; close ours."""
    try:
        with contextlib.suppress(BrokenPipeError):
            unwritten = memoryview(data)
            while unwritten:
                unwritten = unwritten[os.write(fd, unwritten) :]
    finally:
        os.close(fd)


async def cli_run(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m cli <args>` with this environment, run to its end (a minute at most)."""
    child = await start_cli(args, env, stdin=stdin is not None)
    try:
        stdout, stderr = await asyncio.wait_for(
            child.communicate(stdin.encode() if stdin is not None else None), CLI_TIMEOUT_SECONDS
        )
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    code = child.returncode
    assert code is not None
    return subprocess.CompletedProcess(
        ["python", "-m", "cli", *args], code, stdout.decode(), stderr.decode()
    )


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cli <args>` with these settings, run to its end, its output captured.

    Blocking, as subprocess.run is, wherever it is called: on a thread of its own, which has
    no event loop running."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, cli_run(settings_env(settings), *args)).result()


class CliProcess:
    """`python -m cli <args>` as a child process, with its output collected as it comes."""

    def __init__(self, name: str, args: Sequence[str], settings: Settings) -> None:
        self.name = name
        self._args = list(args)
        self._env = settings_env(settings)
        self._process: CliChild | None = None
        self._reader: asyncio.Task[None] | None = None
        self._chunks: list[str] = []
        self._new_output = asyncio.Event()

    @property
    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return "".join(self._chunks)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self._running().returncode

    async def start(self) -> None:
        """Start the child; it gets its own session, so a Ctrl-C in pytest does not reach it."""
        self._process = await start_cli(self._args, self._env, stderr_into_stdout=True)
        self._reader = asyncio.create_task(self._collect_output(self._process))

    async def wait_for_output(self, text: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until the output contains text; fail if the process exits or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in self.output:
            if self.returncode is not None and self._reader is not None and self._reader.done():
                raise self.failure(f"exited with {self.returncode} before printing {text!r}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self.failure(f"did not print {text!r} within {timeout}s")
            self._new_output.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_output.wait(), min(remaining, 0.2))

    def send_signal(self, signum: signal.Signals) -> None:
        """Send a signal to the child."""
        self._running().send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """Wait for the child to exit and return its exit code; fail if it takes longer."""
        try:
            code = await asyncio.wait_for(self._running().wait(), timeout)
        except TimeoutError:
            raise self.failure(f"still running after {timeout}s") from None
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
        return code

    async def kill(self) -> int:
        """SIGKILL the child (no chance to clean up) and reap it."""
        process = self._running()
        if process.returncode is None:
            process.kill()
        return await self.wait(STOP_TIMEOUT_SECONDS)

    def failure(self, what: str) -> ProcessFailed:
        """An assertion error about this process, with everything it printed."""
        return ProcessFailed(f"{self.name} (pid {self.pid}) {what}; its output:\n{self.output}")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is None:
            return
        try:
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
        finally:
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
            # pytest shows a test's captured stdout only when it fails.
            print(f"----- output of {self.name} (exit {self._process.returncode}) -----")
            print(self.output)

    def _running(self) -> CliChild:
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._process

    async def _collect_output(self, process: CliChild) -> None:
        # In chunks, not lines: a line longer than the stream's limit (a `dlq export` of a
        # large letter is one line) would end a readline loop and leave the pipe undrained,
        # the child blocked on writing and its exit never seen.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await process.stdout.read(_OUTPUT_CHUNK_BYTES):
            self._chunks.append(decoder.decode(chunk))
            self._new_output.set()
        self._chunks.append(decoder.decode(b"", final=True))
        self._new_output.set()


def _own_health_port(settings: Settings) -> Settings:
    # Workers the tests start must not compete for the default health port.
    return settings.model_copy(update={"worker_health_port": 0})


@contextlib.asynccontextmanager
async def worker_process(settings: Settings) -> AsyncIterator[CliProcess]:
    """`score-ingest worker` as a subprocess, yielded once it consumes scores.persist."""
    async with CliProcess("worker", ["worker"], _own_health_port(settings)) as process:
        await process.wait_for_output(WORKER_READY_LINE)
        yield process


@dataclass
class ApiProcess:
    """A running `score-ingest api` and the URL it serves on."""

    process: CliProcess
    base_url: str

    async def wait_until_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until /readyz answers 200: the publisher is connected and a create is taken.

        The api serves before its publisher has connected (a TLS handshake takes a while
        on a busy machine); until then a create is answered 503.
        """
        await _wait_until_answered(self.process, self.base_url, "/readyz", timeout)


@contextlib.asynccontextmanager
async def api_process(settings: Settings, *, ready: bool = True) -> AsyncIterator[ApiProcess]:
    """`score-ingest api` on a free port, yielded once it is ready (ApiProcess.wait_until_ready).

    With `ready=False` it is yielded once it serves /openapi.json, for tests of an api whose
    broker is out of reach.
    """
    port = free_port()
    async with CliProcess("api", ["api", "--port", str(port)], settings) as process:
        api = ApiProcess(process, f"http://127.0.0.1:{port}")
        await _wait_until_answered(process, api.base_url, "/openapi.json")
        if ready:
            await api.wait_until_ready()
        yield api


async def _wait_until_answered(
    process: CliProcess, base_url: str, path: str, timeout: float = START_TIMEOUT_SECONDS
) -> None:
    """Wait until the api answers path with 200; fail if it exits first, or takes longer
    than timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while True:
            if process.returncode is not None:
                raise process.failure(f"exited with {process.returncode} before {path} was 200")
            with contextlib.suppress(httpx.TransportError):
                response = await client.get(path)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            if loop.time() > deadline:
                raise process.failure(f"{path} not 200 within {timeout}s: {last}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[ScoreWorker]:
    """A ScoreWorker in this process, yielded once it consumes; stopped cleanly afterwards."""
    score_worker = ScoreWorker(_own_health_port(settings))
    task = asyncio.create_task(score_worker.run())
    try:
        async with connect_broker(settings) as broker:
            await broker.wait_for_consumer(QUEUE, task)
        yield score_worker
    finally:
        score_worker.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll condition until it holds; fail saying what did not happen in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


def score_message(**overrides: Any) -> ScoreMessage:
    """A valid score message with a fresh score_id, fields overridden."""
    fields: dict[str, Any] = {
        "score_id": new_score_id(),
        "entity": ENTITY,
        "project": PROJECT,
        "prediction_id": "prediction-1",
        "scorer": f"weave:///{ENTITY}/{PROJECT}/op/exact_match:abc123",
        "value": {"correct": True, "score": 0.75, "labels": ["a", "b"]},
        "evaluation_run_id": "run-1",
        "created_at": datetime.now(UTC),
        "created_by": "key-tests",
    }
    fields.update(overrides)
    return ScoreMessage(**fields)


class Broker:
    """The tests' own view of the broker: publish as a direct publisher would, and look."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def publish(
        self, messages: Iterable[aio_pika.Message], exchange_name: str = EXCHANGE
    ) -> None:
        """Publish to exchange `scores` (or exchange_name), routing key `score.create`, and
        wait for every confirm."""
        exchange = await self._channel.get_exchange(exchange_name, ensure=False)
        await asyncio.gather(
            *(exchange.publish(message, ROUTING_KEY, mandatory=True) for message in messages)
        )

    async def publish_scores(self, scores: Iterable[ScoreMessage]) -> None:
        """Publish scores in the form the API publishes them."""
        await self.publish(to_amqp_message(score) for score in scores)

    async def ready_count(self, queue_name: str) -> int:
        """Messages waiting in a queue for a consumer (not those delivered and unacked)."""
        return (await self._declare_passive(queue_name)).declaration_result.message_count or 0

    async def consumer_count(self, queue_name: str) -> int:
        """Consumers on a queue."""
        return (await self._declare_passive(queue_name)).declaration_result.consumer_count or 0

    async def wait_for_ready_count(
        self, queue_name: str, expected: int, timeout: float = 10.0
    ) -> int:
        """Poll a queue's ready count until it is expected or time runs out; returns the last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            count = await self.ready_count(queue_name)
            if count == expected or loop.time() > deadline:
                return count
            await asyncio.sleep(0.05)

    async def assert_stays_empty(self, queue_name: str, seconds: float = 0.5) -> None:
        """Fail if a queue has, or within the next moments gets, a ready message.

        Messages a consumer held unacked return to the queue shortly after its channel
        closes, so an empty queue right after a worker stops is not yet proof.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            count = await self.ready_count(queue_name)
            assert count == 0, f"{queue_name} holds {count} ready messages"
            if loop.time() > deadline:
                return
            await asyncio.sleep(0.05)

    async def wait_for_consumer(self, queue_name: str, task: asyncio.Task[None]) -> None:
        """Wait until a queue has a consumer, failing early if the task meant to consume ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_SECONDS
        while await self.consumer_count(queue_name) == 0:
            if task.done():
                task.result()
                raise AssertionError(f"the worker ended before consuming {queue_name}")
            if loop.time() > deadline:
                raise AssertionError(f"no consumer on {queue_name} within {START_TIMEOUT_SECONDS}s")
            await asyncio.sleep(0.05)

    async def take(
        self, queue_name: str, expected: int, timeout: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        """Remove and return messages from a queue until expected arrived or time runs out."""
        queue = await self._channel.get_queue(queue_name, ensure=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < expected and loop.time() <= deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                taken.append(message)
        return taken

    async def take_dead_letters(
        self, expected: int, timeout: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        """Remove and return what reached scores.dead."""
        return await self.take(DEAD_LETTER_QUEUE, expected, timeout)

    async def _declare_passive(self, queue_name: str) -> AbstractQueue:
        return await self._channel.declare_queue(queue_name, passive=True)


@contextlib.asynccontextmanager
async def connect_broker(settings: Settings) -> AsyncIterator[Broker]:
    """A Broker on its own connection to the settings' vhost (the first of its nodes that
    answers), with the topology declared."""
    connection = await connect_to_a_node(
        partial(aio_pika.connect, timeout=10), CONNECTION_EXCEPTIONS, BrokerNodes(settings.amqp_url)
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel, settings)
        yield Broker(channel)


@contextlib.asynccontextmanager
async def listening_app(
    settings: Settings, **changes: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app of settings with changes, once its listener for stored scores is connected
    (api/stored_events.py), and a client on it."""
    async with running_app(settings.model_copy(update=changes)) as app, client_for(app) as client:
        await wait_until(
            lambda: app.state.services.stored_events.connected, "the listener connected"
        )
        yield app, client
