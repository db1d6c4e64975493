"""The Ray Serve deployment: a thin wrapper that decodes HTTP, calls the Predictor, encodes the answer.

No ``from __future__ import annotations`` here: FastAPI must see real types on the class-based routes.

Handlers are plain ``def`` so FastAPI runs them in its thread pool; the encoder lock serialises model
work inside one replica, and replicas scale out through Serve.
"""

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kafka.errors import KafkaError
from ray import serve

from serving import metrics
from serving.admin import RegistryAdmin
from serving.asgi import LimitsAndMetrics
from serving.config import ServingConfig
from serving.encoder import Encoder
from serving.errors import (
    BadRequest,
    FeedbackUnavailable,
    Forbidden,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)
from serving.http_api import (
    AdminAction,
    FeedbackAccepted,
    FeedbackRequest,
    ForgetRequest,
    PredictManyResponse,
    PredictRequest,
    PredictResponse,
    V2InferResponse,
    V2Tensor,
    decode_v2_request,
)
from serving.memory import make_memory
from serving.predictor import AdapterCachePolicy, Prediction, Predictor
from serving.sync import ReplicaSync
from streams.errors import StoreUnavailable
from streams.kafka_io import make_producer
from streams.redis_store import RequestEmbeddings
from streams.registry_store import RegistryStore
from streams.schemas import MAX_LABEL_CHARS, MAX_TEXT_CHARS, FeedbackEvent, ForgetEvent

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


MODEL_NAME = "driftserve"
_KNOWN_PATHS = {
    "/healthz",
    "/v1/predict",
    "/v1/feedback",
    "/v1/forget",
    "/metrics",
    "/v2/health/live",
    "/v2/health/ready",
    f"/v2/models/{MODEL_NAME}",
    f"/v2/models/{MODEL_NAME}/ready",
    f"/v2/models/{MODEL_NAME}/infer",
}


def _endpoint(path: str) -> str:
    """A bounded metric label: known paths as themselves, the rest grouped."""
    return path if path in _KNOWN_PATHS else ("/admin" if path.startswith("/admin/") else "other")


api.add_middleware(LimitsAndMetrics, endpoint_of=_endpoint)


@serve.deployment(name="driftserve", max_ongoing_requests=64, health_check_period_s=5)
@serve.ingress(api)
class DriftServe:
    def __init__(self, cfg: ServingConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.cfg = cfg
        api.state.max_body_bytes = cfg.max_body_bytes
        encoder = Encoder(cfg.model_path, device=cfg.device, max_length=cfg.max_length)
        key_encoder = None
        if cfg.runtime == "onnx":  # exported once per base model, verified against torch before use
            from serving.onnx_encoder import OnnxEncoder

            key_encoder = OnnxEncoder(
                cfg.model_path,
                max_length=cfg.max_length,
                cache_dir=cfg.onnx_cache_dir,
                intra_op_threads=1,  # replicas scale out by count; one thread each shares cores fairly
            )
        self.predictor = Predictor(
            encoder,
            make_memory(cfg.memory_index, encoder.dim, device=cfg.device),
            cfg.compensation,
            AdapterCachePolicy(cfg.adapter_cache_size, frozenset(cfg.adapter_pinned_domains)),
            key_encoder=key_encoder,
        )
        self._batched.set_max_batch_size(cfg.batch_max_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        try:
            replica = serve.get_replica_context().replica_id
            self.replica_id, self.replica_actor = replica.unique_id, replica.to_full_id_str()
        except Exception:  # outside Serve (never in production): still answer with something stable
            self.replica_id, self.replica_actor = uuid.uuid4().hex[:8], None
        self.sync = ReplicaSync(
            self.predictor,
            cfg.redis,
            cfg.artifacts_dir,
            cfg.sync_interval_s,
            memory_kind=cfg.memory_index,
            replica_id=self.replica_id,
        )
        self.request_embeddings = RequestEmbeddings(self.sync.client, cfg.redis, encoder.fingerprint)
        self.registry = RegistryStore(self.sync.client, cfg.redis)
        self.admin = RegistryAdmin(self.registry, cfg.artifacts_dir, encoder.fingerprint, encoder.dim)
        self._shadow_queue: queue.Queue = queue.Queue(maxsize=cfg.shadow_queue_size)
        self._shadow_thread = threading.Thread(
            target=self._shadow_loop, name="driftserve-shadow", daemon=True
        )
        self._shadow_thread.start()
        try:  # catch up before taking traffic, so a fresh replica serves the same memory as the others
            self.sync.step()
        except Exception as exc:  # Redis down at start: serve uncompensated, sync thread keeps trying
            log.warning("initial memory sync failed: %s", exc)
        self.sync.start()
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
        """Serve's replica health check: unhealthy only if the sync or shadow thread died."""
        if not self.sync._thread.is_alive():
            raise RuntimeError("sync thread stopped")
        if not self._shadow_thread.is_alive():
            raise RuntimeError("shadow thread stopped")

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
                "replica": self.replica_id,
                "actor": self.replica_actor,
                "model": self.predictor.base_version,
                "rollouts": self.predictor.rollout_versions(),
                "memory_entries": len(self.predictor.memory),
                "adapters": self.predictor.active_versions(),
            }
        )

    # -- prediction: every text goes through one dynamic batch queue --------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def _batched(self, items: list[tuple[str, str | None, str]]) -> list[Prediction]:
        """Requests arriving together share one forward pass (texts of several domains may mix). Two
        batches may be in flight: one tokenizes and searches memory while the other holds the model."""
        return await asyncio.to_thread(self._predict_now, items)

    def _predict_now(self, items: list[tuple[str, str | None, str]]) -> list[Prediction]:
        t0 = time.perf_counter()
        preds = self.predictor.predict(
            [t for t, _, _ in items], [d for _, d, _ in items], [rid for _, _, rid in items]
        )
        latency_ms = (time.perf_counter() - t0) * 1000.0
        try:  # fast path for feedback naming these requests: their memory keys are cached
            self.request_embeddings.put_many(
                [(rid, p.key) for (_, _, rid), p in zip(items, preds, strict=True)],
                [p.mix for p in preds],
            )
        except StoreUnavailable:
            metrics.MEMORY_SYNC_ERRORS.inc()
        for p in preds:
            metrics.PREDICTIONS.labels("adapter" if p.adapter else ("prototype" if p.label else "none")).inc()
            if p.compensated:
                metrics.COMPENSATIONS.inc()
        self._observe(items, preds, latency_ms)
        return preds

    # -- rollouts: what canaries and shadows answered, for the controller's analysis ------------------------
    def _observe(
        self, items: list[tuple[str, str | None, str]], preds: list[Prediction], latency_ms: float
    ) -> None:
        rollouts = self.predictor.rollout_versions()
        if not rollouts:
            return
        now, obs, mirror = time.time(), [], {}
        for (text, _, rid), p in zip(items, preds, strict=True):
            version = rollouts.get(p.domain)
            if version is None:
                continue
            variant = "canary_error" if p.canary_error else p.variant
            metrics.ROLLOUT_ANSWERS.labels(variant).inc()
            obs.append(
                {
                    "rid": rid,
                    "domain": p.domain,
                    "candidate": version,
                    "variant": variant,
                    "served": p.model_version,
                    "label": p.label,
                    "stable_label": p.stable_label if p.variant == "canary" else p.label,
                    "latency_ms": latency_ms,
                    "error": p.canary_error,
                    "replica": self.replica_id,
                    "ts": now,
                }
            )
            if p.shadow:
                mirror.setdefault(p.domain, []).append((text, rid, p))
        for domain, rows in mirror.items():
            try:
                self._shadow_queue.put_nowait((domain, rows))
            except queue.Full:
                metrics.ROLLOUT_ANSWERS.labels("shadow_dropped").inc(len(rows))
        try:
            self.registry.observe(obs)
        except StoreUnavailable:
            metrics.MEMORY_SYNC_ERRORS.inc()

    def _shadow_loop(self) -> None:
        """Mirrored requests run against the shadow candidate off the request path; answers are discarded
        after recording agreement and latency."""
        while True:
            domain, rows = self._shadow_queue.get()
            version = self.predictor.rollout_versions().get(domain)
            t0 = time.perf_counter()
            error = None
            try:
                answers = self.predictor.shadow(
                    domain, [t for t, _, _ in rows], np.stack([p.key for _, _, p in rows])
                )
            except Exception as exc:  # a failing candidate is a finding, not a serving failure
                answers, error = None, type(exc).__name__
                log.warning("shadow candidate %s/%s failed: %s", domain, version, exc)
            if answers is None and error is None:
                continue  # the rollout ended while this waited
            latency_ms = (time.perf_counter() - t0) * 1000.0
            now = time.time()
            obs = []
            for i, (_, rid, stable) in enumerate(rows):
                metrics.ROLLOUT_ANSWERS.labels("shadow").inc()
                obs.append(
                    {
                        "rid": rid,
                        "domain": domain,
                        "candidate": version,
                        "variant": "shadow",
                        "served": stable.model_version,
                        "label": answers[i].label if answers else None,
                        "stable_label": stable.label,
                        "latency_ms": latency_ms,
                        "error": error,
                        "replica": self.replica_id,
                        "ts": now,
                    }
                )
            try:
                self.registry.observe(obs)
            except StoreUnavailable:
                metrics.MEMORY_SYNC_ERRORS.inc()

    async def _infer(self, texts: list[str], domain: str | None, request_id: str) -> list[Prediction]:
        if len(texts) > self.cfg.max_batch_texts:
            raise PayloadTooLarge(f"{len(texts)} texts in one call; at most {self.cfg.max_batch_texts}")
        ids = [request_id] if len(texts) == 1 else [f"{request_id}:{i}" for i in range(len(texts))]
        return list(
            await asyncio.gather(*(self._batched((t, domain, i)) for t, i in zip(texts, ids, strict=True)))
        )

    def reconfigure(self, config: dict) -> None:
        """Serve ``user_config``: batching and the adapter cache change in place, without a restart."""
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s", "max_adapters_per_replica"}
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}")
        if "max_batch_size" in config:
            self._batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        if "max_adapters_per_replica" in config:
            self.predictor.set_cache_policy(
                AdapterCachePolicy(int(config["max_adapters_per_replica"]), self.predictor.cache.pinned)
            )

    @staticmethod
    def _response(p: Prediction, request_id: str) -> PredictResponse:
        return PredictResponse(
            domain=p.domain,
            label=p.label,
            scores=p.scores,
            model_version=p.model_version,
            adapter=p.adapter,
            compensated=p.compensated,
            request_id=request_id,
        )

    @api.post("/v1/predict", response_model=PredictResponse | PredictManyResponse)
    async def predict(
        self, body: PredictRequest, request: Request, response: Response
    ) -> PredictResponse | PredictManyResponse:
        """``{"text": ...}``: one prediction; ``{"texts": [...]}``: ``{"predictions": [...]}``."""
        response.headers["x-driftserve-replica"] = self.replica_id
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        texts = body.all_texts()
        preds = await self._infer(texts, body.domain, request_id)
        if body.text is not None:
            return self._response(preds[0], request_id)
        return PredictManyResponse(
            predictions=[self._response(p, f"{request_id}:{i}") for i, p in enumerate(preds)]
        )

    # -- Open Inference Protocol (KServe v2 REST) ----------------------------------------------------
    def _model(self, name: str) -> None:
        if name != MODEL_NAME:
            raise ModelNotFound(f"model {name!r} not found; this server serves {MODEL_NAME!r}")

    @api.get("/v2/health/live")
    def v2_live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    def v2_ready(self) -> dict:
        self.healthz()  # raises NotReady (503) with the reason
        return {"ready": True}

    @api.get("/v2/models/{name}")
    def v2_metadata(self, name: str) -> dict:
        self._model(name)
        return {
            "name": MODEL_NAME,
            "versions": [self.predictor.base_version],
            "platform": "driftserve",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "scores", "datatype": "BYTES", "shape": [-1]},
                {"name": "model_version", "datatype": "BYTES", "shape": [-1]},
                {"name": "compensated", "datatype": "BOOL", "shape": [-1]},
            ],
        }

    @api.get("/v2/models/{name}/ready")
    def v2_model_ready(self, name: str) -> dict:
        self._model(name)
        self.healthz()
        return {"name": MODEL_NAME, "ready": True}

    @api.post("/v2/models/{name}/infer", response_model=V2InferResponse, response_model_exclude_none=True)
    async def v2_infer(self, name: str, request: Request) -> V2InferResponse:
        """JSON bodies, and the binary tensor extension standard clients use (Inference-Header-Content-Length:
        a JSON header followed by length-prefixed BYTES data)."""
        self._model(name)
        body = decode_v2_request(await request.body(), request.headers.get("inference-header-content-length"))
        (tensor,) = body.inputs
        if tensor.datatype != "BYTES":
            raise BadRequest(f"input {tensor.name!r} must be BYTES (texts), got {tensor.datatype}")
        if not tensor.shape or tensor.shape[0] != len(tensor.data) or any(d != 1 for d in tensor.shape[1:]):
            raise BadRequest(f"input shape {tensor.shape} does not match {len(tensor.data)} texts")
        if not tensor.data or not all(isinstance(t, str) and t.strip() for t in tensor.data):
            raise BadRequest("input data must be non-empty strings")
        if any(len(t) > MAX_TEXT_CHARS for t in tensor.data):
            raise BadRequest(f"a text is longer than {MAX_TEXT_CHARS} characters")
        params = {**(body.parameters or {}), **(tensor.parameters or {})}
        domain = params.get("domain")
        if domain is not None and (
            not isinstance(domain, str) or not domain or len(domain) > MAX_LABEL_CHARS
        ):
            raise BadRequest("parameter domain must be a string")
        request_id = body.id or request.headers.get("x-request-id") or uuid.uuid4().hex
        preds = await self._infer([str(t) for t in tensor.data], domain, request_id)
        n = len(preds)
        return V2InferResponse(
            model_name=MODEL_NAME,
            model_version=self.predictor.base_version,
            id=request_id,
            outputs=[
                V2Tensor(name="label", shape=[n], datatype="BYTES", data=[p.label or "" for p in preds]),
                V2Tensor(
                    name="probability",
                    shape=[n],
                    datatype="FP32",
                    data=[p.scores.get(p.label, 0.0) if p.label else 0.0 for p in preds],
                ),
                V2Tensor(
                    name="scores", shape=[n], datatype="BYTES", data=[json.dumps(p.scores) for p in preds]
                ),
                V2Tensor(
                    name="model_version", shape=[n], datatype="BYTES", data=[p.model_version for p in preds]
                ),
                V2Tensor(name="compensated", shape=[n], datatype="BOOL", data=[p.compensated for p in preds]),
            ],
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

    # -- operator control (bearer token) -------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        token = self.cfg.admin_token
        if not token:
            raise Forbidden("admin API disabled: set DRIFTSERVE_ADMIN_TOKEN to enable it")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            raise Unauthorized("admin endpoints need 'Authorization: Bearer <DRIFTSERVE_ADMIN_TOKEN>'")

    @api.get("/admin/registry")
    def admin_registry(self, request: Request, domain: str | None = None) -> dict:
        self._authorize(request)
        return self.admin.listing(domain)

    @api.get("/admin/registry/{domain}/{version}")
    def admin_version(self, request: Request, domain: str, version: str) -> dict:
        self._authorize(request)
        return self.admin.show(domain, version)

    @api.get("/admin/rollout")
    def admin_rollout_status(self, request: Request, domain: str | None = None) -> dict:
        self._authorize(request)
        return self.admin.status(domain)

    @api.post("/admin/rollout/{domain}/{action}")
    def admin_rollout_action(self, request: Request, domain: str, action: str, body: AdminAction) -> dict:
        self._authorize(request)
        actor = f"admin-http:{body.operator}" if body.operator else "admin-http"
        reason = body.reason or f"operator {action}"
        if action == "promote":
            return self.admin.promote(domain, body.version, actor=actor, reason=reason)
        if action == "rollback":
            return self.admin.rollback(domain, actor=actor, reason=reason)
        if action in {"pause", "resume"}:
            return self.admin.pause(domain, action == "pause", actor=actor, reason=reason)
        raise BadRequest(f"unknown action {action!r}: promote | rollback | pause | resume")

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
    """The bound Serve application for ``serve.run``.

    Every handler here either returns quickly or hands its work to a thread (``_batched``, the plain
    ``def`` routes), so the replica runs them on its own event loop instead of Serve's default second
    loop in a separate thread: one cross-thread hop less per request."""
    options = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **(env_vars or {})}},
    }
    return DriftServe.options(num_replicas=num_replicas, ray_actor_options=options).bind(cfg)
