"""Weave object and op references: weave:///<entity>/<project>/object|op/<name>:<digest>[/<edge>/<value>...]."""

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

SCHEME_PREFIX = "weave:///"
REF_KINDS = ("object", "op")
EDGE_NAMES = ("key", "index", "attr", "id")


class InvalidRefError(ValueError):
    """The string is not a Weave object or op reference."""


@dataclass(frozen=True)
class WeaveRef:
    """A parsed reference to a versioned Weave object or op."""

    entity: str
    project: str
    kind: Literal["object", "op"]
    name: str
    digest: str
    extra: tuple[str, ...] = ()


def parse_weave_ref(uri: str) -> WeaveRef:
    """Parse a weave:/// object or op reference, or raise InvalidRefError saying what is wrong."""
    if not uri.startswith(SCHEME_PREFIX):
        raise InvalidRefError(f"must start with {SCHEME_PREFIX!r}")
    parts = uri[len(SCHEME_PREFIX) :].split("/")
    if len(parts) < 4:
        raise InvalidRefError(
            "must look like weave:///<entity>/<project>/object|op/<name>:<digest>"
        )
    entity, project, kind, name_and_digest, *extra = parts
    if not entity or not project:
        raise InvalidRefError("entity and project must not be empty")
    if kind not in REF_KINDS:
        raise InvalidRefError(f"kind must be 'object' or 'op', not {kind!r}")
    name, sep, digest = name_and_digest.partition(":")
    if not sep or not name or not digest or ":" in digest:
        raise InvalidRefError("the last path part must be <name>:<digest>")
    _check_extra(extra)
    return WeaveRef(
        entity=entity,
        project=project,
        kind="object" if kind == "object" else "op",
        name=unquote(name),
        digest=digest,
        extra=tuple(unquote(part) for part in extra),
    )


def _check_extra(extra: list[str]) -> None:
    if len(extra) % 2:
        raise InvalidRefError("the extra path must be <edge>/<value> pairs")
    for edge, value in zip(extra[::2], extra[1::2], strict=True):
        if edge not in EDGE_NAMES:
            raise InvalidRefError(
                f"extra edge must be one of {', '.join(EDGE_NAMES)}, not {edge!r}"
            )
        if not value:
            raise InvalidRefError(f"extra edge {edge!r} has an empty value")
        if edge == "index" and not value.lstrip("-").isdigit():
            raise InvalidRefError(f"extra edge 'index' needs an integer, not {value!r}")
