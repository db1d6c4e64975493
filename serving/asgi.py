"""Request limits and per-endpoint metrics as a plain ASGI middleware.

Starlette's ``BaseHTTPMiddleware`` (what ``@app.middleware("http")`` installs) runs every request through
an extra task group and memory streams; at serving rates that is a measurable share of a replica's CPU.
This wrapper does the same job on the raw ASGI messages: it reads the body once, answers 413 when the
declared or the actual size is over the limit (chunked bodies are cut off as soon as they pass it, not
read to the end), hands the buffered body to the app, and records the status and latency.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1_000_000


def error_body(error_type: str, message: str) -> bytes:
    """The JSON error shape every endpoint answers with."""
    return json.dumps({"error": message, "error_type": error_type}).encode()


class LimitsAndMetrics:
    """Body-size limit and request metrics around an ASGI app.

    ``max_body_bytes`` is read from ``scope["app"].state`` (set once the deployment knows its config),
    falling back to the constructor's value; ``endpoint_of`` maps a path to a bounded metric label.
    """

    def __init__(
        self,
        app: ASGIApp,
        endpoint_of: Callable[[str], str],
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.endpoint_of = endpoint_of
        self.max_body_bytes = max_body_bytes

    def _limit(self, scope: Scope) -> int:
        state = getattr(scope.get("app"), "state", None)
        return getattr(state, "max_body_bytes", None) or self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body, refusal = await self._read_body(scope, receive, self._limit(scope))
            if refusal is not None:
                await _answer(send_and_record, 413, error_body("payload_too_large", refusal))
                return
            await self.app(scope, _replay(body, receive), send_and_record)
        finally:
            endpoint = self.endpoint_of(scope["path"])
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - start)

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> tuple[bytes, str | None]:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value.decode("latin-1")
                if declared.isdigit() and int(declared) > limit:
                    return b"", f"body of {declared} bytes exceeds {limit}"
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: nothing left to answer
                return b"".join(chunks), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", f"body exceeds the limit of {limit} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the server (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
