"""The Ray Serve deployment: a thin wrapper that decodes HTTP, calls the Predictor, encodes the answer.

No ``from __future__ import annotations`` here: FastAPI must see real types on the class-based routes.

Handlers are plain ``def`` so FastAPI runs them in its thread pool; the encoder lock serialises model
work inside one replica, and replicas scale out through Serve.
"""

import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kafka.errors import KafkaError
from ray import serve

from serving import metrics
from serving.config import ServingConfig
from serving.encoder import Encoder
from serving.errors import FeedbackUnavailable, NotReady, ServingError
from serving.http_api import FeedbackAccepted, FeedbackRequest, ForgetRequest, PredictRequest, PredictResponse
from serving.memory import InProcessMemory
from serving.predictor import Predictor
from serving.sync import ReplicaSync
from streams.errors import StoreUnavailable
from streams.kafka_io import make_producer
from streams.redis_store import RequestEmbeddings
from streams.schemas import DEFAULT_DOMAIN, FeedbackEvent, ForgetEvent

log = logging.getLogger("driftserve.serving")

api = FastAPI(title="driftserve", version="0.1.0", description="Online serving with continual adaptation")


def _error(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "error_type": error_type})


@api.exception_handler(ServingError)
async def _serving_error(_request: Request, exc: ServingError) -> JSONResponse:
    return _error(exc.status_code, exc.error_type, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _error(422, "validation_error", f"{where or 'body'}: {first.get('msg', 'invalid request')}")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        request.headers.get("x-request-id"),
    )
    return _error(500, "internal", "internal error")


@api.middleware("http")
async def _limits_and_metrics(request: Request, call_next):
    start = time.perf_counter()
    endpoint = request.url.path if request.url.path in _KNOWN_PATHS else "other"
    limit = getattr(request.app.state, "max_body_bytes", 1_000_000)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        response: Response = _error(413, "payload_too_large", f"body of {declared} bytes exceeds {limit}")
    else:
        body = await request.body()
        if len(body) > limit:
            response = _error(413, "payload_too_large", f"body of {len(body)} bytes exceeds {limit}")
        else:
            response = await call_next(request)
    metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
    metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - start)
    return response


_KNOWN_PATHS = {"/healthz", "/v1/predict", "/v1/feedback", "/v1/forget", "/metrics"}


@serve.deployment(name="driftserve", max_ongoing_requests=64, health_check_period_s=5)
@serve.ingress(api)
class DriftServe:
    def __init__(self, cfg: ServingConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.cfg = cfg
        api.state.max_body_bytes = cfg.max_body_bytes
        encoder = Encoder(cfg.model_path, device=cfg.device, max_length=cfg.max_length)
        self.predictor = Predictor(encoder, InProcessMemory(encoder.dim), cfg.compensation)
        self.sync = ReplicaSync(self.predictor, cfg.redis, cfg.artifacts_dir, cfg.sync_interval_s)
        self.request_embeddings = RequestEmbeddings(self.sync.client, cfg.redis, encoder.fingerprint)
        try:  # catch up before taking traffic, so a fresh replica serves the same memory as the others
            self.sync.step()
        except Exception as exc:  # Redis down at start: serve uncompensated, sync thread keeps trying
            log.warning("initial memory sync failed: %s", exc)
        self.sync.start()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in production): still answer with something stable
            self.replica_id = uuid.uuid4().hex[:8]
        self._producer = None
        self._producer_error: str | None = None
        self._kafka_ok = False
        self._connect_producer()

    def _connect_producer(self):
        if self._producer is None:
            try:
                self._producer = make_producer(self.cfg.kafka)
                self._producer_error = None
            except KafkaError as exc:
                self._producer_error = str(exc)
        return self._producer

    def __del__(self) -> None:
        try:
            self.sync.stop()
            if self._producer is not None:
                self._producer.close(timeout=2)
        except Exception:
            pass

    def check_health(self) -> None:
        """Serve's replica health check: unhealthy only if the sync thread died."""
        if not self.sync._thread.is_alive():
            raise RuntimeError("sync thread stopped")

    def _remember_request(self, request_id: str, key) -> None:
        """Fast path for feedback naming this request: its memory key is cached, not re-encoded."""
        try:
            self.request_embeddings.put_many([(request_id, key)])
        except StoreUnavailable:
            metrics.MEMORY_SYNC_ERRORS.inc()

    def _kafka_connected(self) -> bool:
        producer = self._connect_producer()
        if producer is None:
            return False
        if not self._kafka_ok:
            try:  # a metadata round-trip proves the broker answers and the topic exists
                self._kafka_ok = bool(producer.partitions_for(self.cfg.kafka.feedback_topic))
            except KafkaError as exc:
                self._producer_error = str(exc)
        return self._kafka_ok

    @api.get("/healthz")
    def healthz(self) -> JSONResponse:
        problems = []
        if not self._kafka_connected():
            problems.append(f"feedback stream not connected ({self._producer_error or 'no metadata'})")
        if not self.sync.healthy:
            problems.append("error memory (Redis) not reachable")
        if problems:
            raise NotReady("; ".join(problems))
        return JSONResponse(
            {
                "status": "ok",
                "model": self.predictor.base_version,
                "memory_entries": len(self.predictor.memory),
                "adapters": self.predictor.active_versions(),
            }
        )

    @api.post("/v1/predict", response_model=PredictResponse)
    def predict(self, body: PredictRequest, request: Request, response: Response) -> PredictResponse:
        response.headers["x-driftserve-replica"] = self.replica_id
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        domain = body.domain or DEFAULT_DOMAIN
        (pred,) = self.predictor.predict([body.text], [domain])
        self._remember_request(request_id, pred.key)
        metrics.PREDICTIONS.labels(
            "adapter" if pred.adapter else ("prototype" if pred.label else "none")
        ).inc()
        if pred.compensated:
            metrics.COMPENSATIONS.inc()
        return PredictResponse(
            label=pred.label,
            scores=pred.scores,
            model_version=pred.model_version,
            adapter=pred.adapter,
            compensated=pred.compensated,
            request_id=request_id,
        )

    @api.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted)
    def feedback(self, body: FeedbackRequest) -> FeedbackAccepted:
        event = FeedbackEvent(**body.model_dump(exclude_none=True))
        accepted = self._produce(self.cfg.kafka.feedback_topic, event.domain.encode(), event.to_bytes())
        return accepted.model_copy(update={"event_id": event.event_id})

    def _produce(self, topic: str, key: bytes, value: bytes) -> FeedbackAccepted:
        producer = self._connect_producer()
        if producer is None:
            metrics.FEEDBACK_PRODUCED.labels("unavailable").inc()
            raise FeedbackUnavailable(f"feedback stream unavailable: {self._producer_error}")
        try:
            meta = producer.send(topic, key=key, value=value).get(timeout=10)
        except KafkaError as exc:
            metrics.FEEDBACK_PRODUCED.labels("failed").inc()
            raise FeedbackUnavailable(f"not stored: {exc}") from exc
        metrics.FEEDBACK_PRODUCED.labels("accepted").inc()
        return FeedbackAccepted(event_id="", topic=meta.topic, partition=meta.partition, offset=meta.offset)

    @api.post("/v1/forget", status_code=202, response_model=FeedbackAccepted)
    def forget(self, body: ForgetRequest) -> FeedbackAccepted:
        """Remove every memory entry and replay-buffer example derived from these events or subject."""
        event = ForgetEvent(
            forget_id=body.forget_id or uuid.uuid4().hex,
            event_ids=tuple(body.event_ids),
            subject_id=body.subject_id,
            reason=body.reason,
        )
        accepted = self._produce(self.cfg.kafka.forget_topic, event.forget_id.encode(), event.to_bytes())
        return accepted.model_copy(update={"event_id": event.forget_id})

    @api.get("/metrics")
    def prometheus(self) -> Response:
        payload, content_type = metrics.render()
        return Response(content=payload, media_type=content_type)


def build(
    cfg: ServingConfig,
    *,
    num_replicas: int = 1,
    num_cpus: float = 0.5,
    num_gpus: float = 0.0,
    env_vars: dict[str, str] | None = None,
):
    """The bound Serve application for ``serve.run``."""
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    return DriftServe.options(num_replicas=num_replicas, ray_actor_options=options).bind(cfg)
