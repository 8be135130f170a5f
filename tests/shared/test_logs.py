"""Structured logs: JSON lines with the request id, plain text on request, nothing secret."""

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.logs import JsonFormatter, configure_logging, request_id
from shared.settings import Settings
from tests.conftest import ENTITY, PROJECT, basic_auth, bearer_auth, score_body
from tests.support.processes import api_process

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
def test_configure_logging_text_gives_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logging.getLogger(LOGGER).info("plain %s", "words")
    logging.getLogger(LOGGER).debug("not at INFO")

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO {re.escape(LOGGER)} plain words",
        lines[0],
    ), lines[0]


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
        api_key.rsplit("_", 1)[1],
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
