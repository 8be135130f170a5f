"""Logs: JSON lines with the request id off a terminal, readable lines on one or on request,
nothing secret."""

import io
import json
import logging
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.logs import JsonFormatter, TextFormatter, configure_logging, request_id
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body
from tests.support.processes import REPO_ROOT, api_process
from tests.support.services import free_port

LOGGER = "tests.shared.logs"


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own whose records JsonFormatter writes to a string buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as it was after a test reconfigures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def entries(stream: io.StringIO) -> list[dict[str, Any]]:
    """The log lines written so far, each parsed as one JSON object."""
    lines = stream.getvalue().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in parsed), lines
    return parsed


def test_json_lines_carry_time_level_logger_message_and_extra_fields(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    before = datetime.now().astimezone()
    logger.info("stored %d scores", 3, extra={"score_id": "0192-abc", "batch_size": 3})
    logger.warning("a message\nover two lines", extra={"when": timedelta(seconds=2)})
    logger.debug("details")

    stored, warned, debugged = entries(stream)
    assert stored["level"] == "INFO"
    assert stored["logger"] == LOGGER
    assert stored["message"] == "stored 3 scores"
    assert stored["score_id"] == "0192-abc"
    assert stored["batch_size"] == 3
    logged_at = datetime.fromisoformat(stored["time"])
    assert logged_at.utcoffset() == timedelta(0), "times are in UTC"
    assert before - timedelta(seconds=1) <= logged_at <= datetime.now().astimezone()
    assert "request_id" not in stored, "no request, no request id"
    assert "exception" not in stored
    for standard in ("args", "msg", "levelno", "pathname", "lineno", "created", "process"):
        assert standard not in stored, standard

    assert warned["level"] == "WARNING"
    assert warned["message"] == "a message\nover two lines"
    assert warned["when"] == "0:00:02", "values JSON cannot hold are written as text"
    assert debugged["level"] == "DEBUG"


def test_json_lines_carry_the_request_id_of_the_context(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    token = request_id.set("req-7f3a")
    try:
        logger.info("inside a request")
    finally:
        request_id.reset(token)
    logger.info("outside any request")

    inside, outside = entries(stream)
    assert inside["request_id"] == "req-7f3a"
    assert "request_id" not in outside


def test_json_lines_carry_the_exception_text(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    try:
        raise ValueError("the value was wrong")
    except ValueError:
        logger.exception("storing failed", extra={"score_id": "0192-def"})

    (entry,) = entries(stream)
    assert entry["level"] == "ERROR"
    assert entry["message"] == "storing failed"
    assert entry["score_id"] == "0192-def"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: the value was wrong" in entry["exception"]


@pytest.mark.usefixtures("root_logging")
def test_configure_logging_text_gives_readable_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logging.getLogger(LOGGER).info("plain %s", "words", extra={"score_id": "0192-abc"})
    logging.getLogger(LOGGER).debug("not at INFO")

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} INFO    {re.escape(LOGGER)} "
        r"plain words score_id=0192-abc",
        lines[0],
    ), lines[0]
    assert "\x1b" not in lines[0], "no colour codes when stderr is not a terminal"


@pytest.mark.usefixtures("root_logging")
def test_configure_logging_auto_gives_json_lines_off_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "auto")
    logging.getLogger(LOGGER).info("to a pipe")

    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "to a pipe"


def text_line(record: logging.LogRecord) -> str:
    """The record as TextFormatter writes it, without colour."""
    return TextFormatter().format(record)


def record(message: str, **extra: Any) -> logging.LogRecord:
    """A WARNING record of LOGGER with these extra fields, as a log call would make it."""
    return logging.getLogger(LOGGER).makeRecord(
        LOGGER, logging.WARNING, __file__, 1, message, (), None, extra=extra
    )


def test_text_lines_show_extra_fields_and_the_request_id_as_key_value_pairs() -> None:
    token = request_id.set("req-7f3a")
    try:
        line = text_line(
            record("stored", score_id="0192-abc", batch_size=3, detail="two words", ok=None)
        )
    finally:
        request_id.reset(token)

    assert line.endswith(
        "WARNING tests.shared.logs stored request_id=req-7f3a score_id=0192-abc batch_size=3 "
        'detail="two words" ok=null'
    ), line


def test_text_lines_escape_what_would_drive_a_terminal() -> None:
    line = text_line(record("detail: \x1b[2Jgone\u202e", reason="bad\x1b[31m"))

    assert "\x1b" not in line, repr(line)
    assert "\u202e" not in line, repr(line)
    assert "detail: \\x1b[2Jgone\\u202e" in line
    assert 'reason="bad\\u001b[31m"' in line


def test_text_lines_indent_continuation_lines_and_the_traceback() -> None:
    try:
        raise ValueError("the value was wrong")
    except ValueError:
        failed = logging.getLogger(LOGGER).makeRecord(
            LOGGER, logging.ERROR, __file__, 1, "first\nsecond", (), sys.exc_info()
        )
    first, *rest = text_line(failed).split("\n")

    assert first.endswith("ERROR   tests.shared.logs first"), first
    assert rest[0] == "    second"
    assert rest[1] == "    Traceback (most recent call last):"
    assert rest[-1] == "    ValueError: the value was wrong"
    assert all(line.startswith("    ") for line in rest), "a record's lines after its first"


def test_text_lines_colour_the_level_only_when_asked() -> None:
    coloured = TextFormatter(colour=True).format(record("careful"))

    assert "\x1b[33mWARNING\x1b[0m" in coloured
    assert "\x1b" not in text_line(record("careful"))


def cli_log_output(log_format: str | None, *, terminal: bool) -> str:
    """What `score-ingest topology` writes when every broker node is down (it logs a warning
    for the first node, then fails), on a pseudo-terminal or a pipe."""
    down = [free_port(), free_port()]
    env = {key: value for key, value in os.environ.items() if key not in {"LOG_FORMAT", "NO_COLOR"}}
    env["AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{down[0]},127.0.0.1:{down[1]}/"
    if log_format is not None:
        env["LOG_FORMAT"] = log_format
    command = [sys.executable, "-m", "cli", "topology"]
    if not terminal:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        return done.stderr
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        output = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end of the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) != 0
    finally:
        os.close(leader)
    return output.decode()


def warning_lines(output: str) -> list[str]:
    """The lines of output that carry the first node's warning."""
    return [line for line in output.splitlines() if "not reachable" in line]


def test_the_cli_logs_readable_coloured_lines_on_a_terminal() -> None:
    (line,) = warning_lines(cli_log_output(None, terminal=True))

    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \x1b\[33mWARNING", line), line
    assert "shared.broker broker node 127.0.0.1:" in line
    assert not line.lstrip().startswith("{")


def test_the_cli_logs_json_lines_off_a_terminal_and_when_told_to() -> None:
    for output in (
        cli_log_output(None, terminal=False),
        cli_log_output("json", terminal=True),
    ):
        (line,) = warning_lines(output)
        entry = json.loads(line)
        assert entry["level"] == "WARNING"
        assert entry["logger"] == "shared.broker"


def test_the_cli_logs_text_off_a_terminal_when_told_to() -> None:
    (line,) = warning_lines(cli_log_output("text", terminal=False))

    assert " WARNING shared.broker broker node 127.0.0.1:" in line
    assert "\x1b" not in line, "no colour off a terminal"


@pytest.mark.usefixtures("root_logging")
def test_configure_logging_json_sends_every_logger_through_the_formatter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("debug", "json")
    logging.getLogger("some.library").debug("from a library")

    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "DEBUG",
        "some.library",
        "from a library",
    )


async def test_the_api_logs_json_lines_and_never_the_key(settings: Settings, api_key: str) -> None:
    debug_settings = settings.model_copy(update={"log_level": "DEBUG", "log_format": "json"})
    key_id = api_key.split("_")[1]
    wrong_key = f"si_{key_id}_{'A' * 43}"
    secrets = {
        api_key,
        api_key.split("_", 2)[2],  # the secret may hold "_" itself
        basic_auth(api_key)["Authorization"].split()[1],
        wrong_key,
        basic_auth(wrong_key)["Authorization"].split()[1],
    }
    path = f"/v2/{ENTITY}/{PROJECT}/scores"

    requests = [
        ({**basic_auth(api_key), "X-Request-ID": "logs-basic"}, score_body(), 200),
        (bearer_auth(api_key), score_body(), 200),
        (basic_auth(wrong_key), score_body(), 401),
        (bearer_auth(wrong_key), score_body(), 401),
        (basic_auth(api_key), score_body(scorer="not a ref"), 422),
    ]
    async with api_process(debug_settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            for headers, body, status in requests:
                response = await client.post(path, json=body, headers=headers)
                assert response.status_code == status, response.text
        api.process.send_signal(signal.SIGTERM)
        await api.process.wait(15)
        output = api.process.output

    logged = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert logged, "the api logged nothing"
    for entry in logged:
        assert isinstance(entry, dict), entry
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    assert any(entry["level"] == "DEBUG" for entry in logged), "DEBUG records are logged"
    assert any(
        entry.get("request_id") == "logs-basic" and "POST" in entry["message"] for entry in logged
    ), "the request's access log line carries its X-Request-ID"
    for secret in secrets:
        assert secret not in output, "a key (or its Basic form) reached the logs"
