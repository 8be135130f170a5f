"""Prometheus metrics of the API, and the middleware that counts requests and tags logs."""

import os
import re
import time
from functools import lru_cache

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.limits import header
from api.tracing import UNTRACED_PATHS, RequestSpan
from shared.logs import request_id
from shared.tracing import Tracing

HTTP_REQUESTS = Counter(
    "score_ingest_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "score_ingest_http_request_seconds",
    "Time to answer an HTTP request, by route template",
    ["route"],
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "score_ingest_publish_confirm_seconds",
    "Time from publishing a message (one score or a batch) to the broker's confirm",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SCORES_ACCEPTED = Counter(
    "score_ingest_scores_accepted_total", "Scores the broker confirmed and the API answered 200 for"
)
PUBLISH_FAILURES = Counter(
    "score_ingest_publish_failures_total",
    "Publishes (one score or a batch) not confirmed, by why: "
    "unavailable, blocked, refused, unroutable, timeout",
    ["reason"],
)
QUOTA_REJECTIONS = Counter(
    "score_ingest_quota_rejections_total",
    "Creates answered 429 for a key's or an entity's quota, by entity "
    "(the first 100 entities refused have a label each, the rest count as `other`)",
    ["entity"],
)

_REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# nginx's code for a request whose client went away before it was answered.
CLIENT_CLOSED_REQUEST = 499


class RequestContextMiddleware:
    """Give each request an id (X-Request-ID, taken from the client when sane) and count it;
    with tracing, a span (api/tracing.py)."""

    def __init__(self, app: ASGIApp, tracing: Tracing | None = None) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with its id in the log context; count it when answered."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (header(scope, _REQUEST_ID_HEADER) or b"").decode("latin-1")
        current = given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        token = request_id.set(current)
        span = (
            None
            if self.tracing is None or scope["path"] in UNTRACED_PATHS
            else RequestSpan(self.tracing, scope, current)
        )
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", current.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
            if status == 500 and not answered:
                # The app returned without answering: the client left, or the server cut off
                # a body that stopped arriving (and answered 408 itself). Not a server error.
                status = CLIENT_CLOSED_REQUEST
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            _requests(scope["method"], template, status).inc()
            _seconds(template).observe(time.perf_counter() - started)
            if span is not None:
                span.end(template, status)
            request_id.reset(token)


# Looking up a labelled child takes a lock and checks the labels; these are few, so keep them.
@lru_cache(maxsize=1024)
def _requests(method: str, route: str, status: int) -> Counter:
    return HTTP_REQUESTS.labels(method, route, str(status))


@lru_cache(maxsize=256)
def _seconds(route: str) -> Histogram:
    return HTTP_SECONDS.labels(route)
