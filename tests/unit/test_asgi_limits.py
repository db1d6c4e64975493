"""The body-limit and metrics middleware on a small Starlette app (the real middleware, no Serve)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving import metrics
from serving.asgi import LimitsAndMetrics


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"size": len(body), "head": body[:8].decode()})


async def _boom(_request: Request) -> JSONResponse:
    raise RuntimeError("handler bug")


def _client(limit: int = 100) -> TestClient:
    app = Starlette(routes=[Route("/echo", _echo, methods=["POST"]), Route("/boom", _boom)])
    app.state.max_body_bytes = limit
    app.add_middleware(LimitsAndMetrics, endpoint_of=lambda path: path if path == "/echo" else "other")
    return TestClient(app, raise_server_exceptions=False)


def _count(endpoint: str, status: str) -> float:
    return metrics.REQUESTS.labels(endpoint, status)._value.get()


def test_a_body_within_the_limit_reaches_the_app_whole_and_is_counted():
    before = _count("/echo", "200")
    r = _client().post("/echo", content=b"0123456789" * 10)
    assert r.status_code == 200 and r.json() == {"size": 100, "head": "01234567"}
    assert _count("/echo", "200") == before + 1


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    before = _count("/echo", "413")
    r = _client().post("/echo", content=b"x" * 101)
    assert r.status_code == 413
    assert r.json() == {"error": "body of 101 bytes exceeds 100", "error_type": "payload_too_large"}
    assert _count("/echo", "413") == before + 1


def test_a_chunked_body_without_a_declared_length_is_measured_as_it_arrives():
    r = _client().post("/echo", content=iter([b"y" * 30] * 50))  # Transfer-Encoding: chunked
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert "100 bytes" in r.json()["error"]
    small = _client().post("/echo", content=iter([b"ab", b"cd"]))
    assert small.status_code == 200 and small.json()["size"] == 4


@pytest.mark.parametrize("limit", [None, 0])
def test_the_constructor_limit_applies_when_the_app_sets_none(limit):
    app = Starlette(routes=[Route("/echo", _echo, methods=["POST"])])
    if limit is not None:
        app.state.max_body_bytes = limit
    app.add_middleware(LimitsAndMetrics, endpoint_of=lambda p: p, max_body_bytes=4)
    client = TestClient(app)
    assert client.post("/echo", content=b"abcd").status_code == 200
    assert client.post("/echo", content=b"abcde").status_code == 413


def test_a_handler_exception_is_counted_as_500():
    before = _count("other", "500")
    r = _client().get("/boom")
    assert r.status_code == 500
    assert _count("other", "500") == before + 1
