"""Logs on stderr: JSON lines for machines, readable lines for people, with the request id
(and the trace id, when tracing is on).

LOG_FORMAT chooses: `json` (one object per line), `text` (one readable line per record), or
`auto`, the default: text when stderr is a terminal (`make run`), JSON otherwise (containers,
pipes, files), so nobody has to remember to switch. Fields passed as `extra=` (score_id,
reason, …) become keys of the object, or `key=value` pairs after the text. Nothing secret is
ever logged: API keys never reach a log call, and request headers are not logged.
"""

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# The trace of the request, or of the worker's batch, when tracing is on (shared/tracing.py).
trace_id: ContextVar[str | None] = ContextVar("trace_id", default=None)

LogFormat = Literal["auto", "json", "text"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn's color_message repeats the message with terminal colour codes.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The record's fields from `extra=`, with the request and trace ids of the context first."""
    fields: dict[str, Any] = {}
    current_request = request_id.get()
    if current_request is not None:
        fields["request_id"] = current_request
    current_trace = trace_id.get()
    if current_trace is not None:
        fields["trace_id"] = current_trace
    fields.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
    return fields


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as `{"time", "level", "logger", "message", ...extra}`."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_LEVEL_COLOURS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"
_CONTINUATION = "\n    "


def _printable(text: str) -> str:
    """text with control and format characters escaped (a publisher's bytes in a dead letter's
    detail must not drive the terminal); line breaks become indented continuation lines."""
    if text.isprintable():
        return text
    lines = text.split("\n")
    return _CONTINUATION.join(
        "".join(char if char.isprintable() else repr(char)[1:-1] for char in line) for line in lines
    )


def _value(value: Any) -> str:
    """A field's value as `key=value` shows it: bare when it reads unambiguously, else quoted."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and text.isprintable() and not any(char in text for char in ' "='):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """Formats a record as one readable line: local time, level, logger, message, key=value.

    An exception's traceback follows on indented lines. With colour, the level is coloured
    (for a terminal; NO_COLOR turns it off, as https://no-color.org asks).
    """

    def __init__(self, colour: bool = False) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        """`2026-12-04 10:31:07.412 WARNING worker.consumer message key=value …`."""
        moment = datetime.fromtimestamp(record.created).astimezone()
        level = f"{record.levelname:<7}"
        if self.colour and record.levelname in _LEVEL_COLOURS:
            level = f"{_LEVEL_COLOURS[record.levelname]}{level}{_RESET}"
        parts = [
            moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}",
            level,
            record.name,
            _printable(record.getMessage()),
        ]
        parts.extend(f"{_printable(key)}={_value(value)}" for key, value in _extra(record).items())
        line = " ".join(parts)
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += _CONTINUATION + _CONTINUATION.join(trace.splitlines())
        return line


def text_wanted(log_format: LogFormat, stream: TextIO) -> bool:
    """Whether records go out as text: asked for, or `auto` and the stream is a terminal."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty is not None and isatty())
    return log_format == "text"


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    """Send every log record to stderr, as JSON lines or readable text lines (LOG_FORMAT)."""
    stream = sys.stderr
    handler = logging.StreamHandler(stream)
    if text_wanted(log_format, stream):
        colour = stream.isatty() and not os.environ.get("NO_COLOR")
        handler.setFormatter(TextFormatter(colour=colour))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
