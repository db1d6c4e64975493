"""How the replay talks to a deployment: predictions over HTTP, labels as Kafka feedback.

Only public interfaces are used (``POST /v1/predict``, ``GET /healthz``, the feedback topic), so the
replay measures any deployment, not just the embedded one. The runner sees two small protocols; tests
swap in fakes that record the order of calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from streams.kafka_io import KafkaConfig
from streams.schemas import FeedbackEvent


class TransportError(RuntimeError):
    """A request or feedback write failed; ``kind`` is a short bounded label for the error table."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(f"{kind}: {message}")


@dataclass(frozen=True)
class Answer:
    """What ``/v1/predict`` answered (the fields the evaluation uses)."""

    label: str | None
    scores: dict[str, float]
    model_version: str
    adapter: str | None
    compensated: bool
    request_id: str | None


class PredictClient(Protocol):
    def predict(self, text: str, domain: str | None) -> Answer: ...

    def health(self) -> dict[str, Any] | None: ...


class FeedbackSink(Protocol):
    def send(self, event: FeedbackEvent) -> None: ...

    def flush(self) -> None: ...

    def drain_failures(self) -> list[tuple[str, str]]:
        """(event_id, message) of writes that failed after ``send`` returned."""
        ...


class HttpPredictClient:
    """``/v1/predict`` with bounded retries on transport errors and 502-504 (predict has no side
    effects, so a retry cannot change what the system learns)."""

    RETRY_STATUS = frozenset({502, 503, 504})

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.retries = retries
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)

    def predict(self, text: str, domain: str | None) -> Answer:
        last: TransportError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.25 * 2**attempt)
            try:
                resp = self._client.post("/v1/predict", json={"text": text, "domain": domain})
            except httpx.TimeoutException as exc:
                last = TransportError("predict_timeout", str(exc) or "timed out")
                continue
            except httpx.HTTPError as exc:
                last = TransportError("predict_connection", str(exc) or type(exc).__name__)
                continue
            if resp.status_code == 200:
                return _answer(resp)
            last = TransportError(f"predict_http_{resp.status_code}", _error_text(resp))
            if resp.status_code not in self.RETRY_STATUS:
                break
        assert last is not None
        raise last

    def health(self) -> dict[str, Any] | None:
        """The ``/healthz`` body when ready, else None (not ready or unreachable)."""
        try:
            resp = self._client.get("/healthz", timeout=5)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        try:
            body = resp.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def close(self) -> None:
        self._client.close()


def _answer(resp: httpx.Response) -> Answer:
    try:
        body = resp.json()
        return Answer(
            label=body.get("label"),
            scores=body.get("scores") or {},
            model_version=str(body.get("model_version", "")),
            adapter=body.get("adapter"),
            compensated=bool(body.get("compensated", False)),
            request_id=body.get("request_id"),
        )
    except (ValueError, AttributeError) as exc:
        raise TransportError("predict_bad_response", resp.text[:300]) from exc


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("error") or body)[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]


class KafkaFeedbackSink:
    """Feedback events on the feedback topic, keyed by domain, exactly as driftserve's own producer
    writes them (same client settings, security included). Sends are asynchronous (the replay must not
    wait a broker round-trip per event); failures are collected by callback with the event id."""

    def __init__(self, kafka: KafkaConfig) -> None:
        from kafka.errors import KafkaError

        from streams.kafka_io import make_producer

        self.topic = kafka.feedback_topic
        try:
            self._producer = make_producer(kafka)
        except KafkaError as exc:
            raise TransportError("feedback_connect", f"Kafka at {kafka.bootstrap_servers}: {exc}") from exc
        self._failures: list[tuple[str, str]] = []

    def send(self, event: FeedbackEvent) -> None:
        from kafka.errors import KafkaError

        try:
            future = self._producer.send(self.topic, key=event.domain.encode(), value=event.to_bytes())
        except KafkaError as exc:
            raise TransportError("feedback_kafka", str(exc)) from exc
        future.add_errback(lambda exc, eid=event.event_id: self._failures.append((eid, str(exc))))

    def flush(self) -> None:
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=30)
        except KafkaError as exc:
            raise TransportError("feedback_flush", str(exc)) from exc

    def drain_failures(self) -> list[tuple[str, str]]:
        out, self._failures = self._failures, []
        return out

    def close(self) -> None:
        self._producer.close(timeout=10)
