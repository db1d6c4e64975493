"""``driftserve bench feedback``: how fast feedback becomes a corrected prediction, and ingestion rate.

Measured against a running driftserve (the embedded stack by default):

- feedback-to-fix when idle: single events a second apart, each followed to its fix (the demo's case:
  consumers idle between events, so a broker that holds empty fetches shows here, not under load);
- feedback-to-fix: feedback is produced to Kafka at ``rate`` events/s for ``duration`` s, each event a
  new text with a label never seen before (so the prediction is wrong until the memory has it); for a
  sample of events a prober predicts the same text until *every* replica (told apart by the
  ``x-driftserve-replica`` header) answers the fed-back label. The time from the broker's acknowledgement
  of the feedback to the last replica's first correct answer is the fix time.
- ingestion: a burst of events is produced as fast as possible and timed until all are in the error
  memory, once with texts to encode and once naming request ids (the fast path, no re-encoding).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from kafka import KafkaProducer

from ops.settings import Settings
from serving.encoder import default_model_path, model_fingerprint
from streams.redis_store import MemoryLog, connect


def _vocabulary() -> list[str]:
    vocab = (Path(default_model_path()) / "vocab.txt").read_text().split()
    return [w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 4]


class _Texts:
    def __init__(self, seed: int) -> None:
        self.words = _vocabulary()
        self.rng = random.Random(seed)

    def __call__(self) -> str:
        return " ".join(self.rng.choice(self.words) for _ in range(10))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


class FeedbackBench:
    def __init__(self, settings: Settings, url: str, bootstrap: str, seed: int = 0) -> None:
        self.settings = settings
        self.url = url
        self.topic = settings.feedback_topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
        self.texts = _Texts(seed)
        rcfg = settings.redis()
        self.log = MemoryLog(
            connect(rcfg), rcfg, model_fingerprint(settings.model_path or default_model_path())
        )
        self.run_id = uuid.uuid4().hex[:6]

    def replicas(self, client: httpx.Client, probes: int = 40) -> set[str]:
        return {client.get("/healthz").json()["replica"] for _ in range(probes)}

    def _send(self, event: dict) -> float:
        """Produce and wait for the broker's ack; returns the ack time (monotonic)."""
        self.producer.send(self.topic, key=event["domain"].encode(), value=json.dumps(event).encode()).get(10)
        return time.monotonic()

    # -- feedback-to-fix ----------------------------------------------------------------------------
    def fix_times(
        self, rate: float, duration: float, sample_every: int, timeout: float, poll_interval: float = 0.05
    ) -> dict[str, Any]:
        domain = f"bench-fix-{self.run_id}"
        with httpx.Client(base_url=self.url, timeout=30) as client:
            replicas = self.replicas(client)
        results: list[float] = []
        misses = 0
        lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=6)  # enough that a probe never waits for a worker

        def probe(text: str, label: str, acked: float) -> None:
            nonlocal misses
            fixed: set[str] = set()
            with httpx.Client(base_url=self.url, timeout=30) as client:
                while time.monotonic() - acked < timeout:
                    time.sleep(poll_interval)  # probes must not starve the system they measure
                    r = client.post("/v1/predict", json={"text": text, "domain": domain})
                    if r.status_code == 200 and r.json()["label"] == label:
                        fixed.add(r.headers.get("x-driftserve-replica", "?"))
                        if fixed >= replicas:
                            with lock:
                                results.append(time.monotonic() - acked)
                            return
            with lock:
                misses += 1

        sent = 0
        start = time.monotonic()
        futures = []
        while time.monotonic() - start < duration:
            due = start + sent / rate
            if (delay := due - time.monotonic()) > 0:
                time.sleep(delay)
            text, label = self.texts(), f"fix-{self.run_id}-{sent}"
            event = {"event_id": f"{domain}-{sent}", "text": text, "label": label, "domain": domain}
            if sent % sample_every == 0:
                acked = self._send(event)
                futures.append(pool.submit(probe, text, label, acked))
            else:
                self.producer.send(self.topic, key=domain.encode(), value=json.dumps(event).encode())
            sent += 1
        self.producer.flush()
        elapsed = time.monotonic() - start
        for f in futures:
            f.result()
        pool.shutdown()
        return {
            "target_rate": rate,
            "achieved_rate": sent / elapsed,
            "events": sent,
            "replicas": sorted(replicas),
            "sampled": len(futures),
            "not_fixed_within_timeout": misses,
            "fix_seconds": _percentiles(results),
            "within_1s": float(np.mean([t <= 1.0 for t in results])) if results else 0.0,
            "samples": results,
        }

    # -- ingestion ----------------------------------------------------------------------------------
    def ingestion(self, n: int, fast_path: bool) -> dict[str, Any]:
        domain = f"bench-ingest-{self.run_id}-{'fast' if fast_path else 'encode'}"
        texts = [self.texts() for _ in range(n)]
        request_ids: list[str | None] = [None] * n
        if fast_path:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                for i, text in enumerate(texts):
                    request_ids[i] = client.post("/v1/predict", json={"text": text, "domain": domain}).json()[
                        "request_id"
                    ]
        self._drain()
        before = len(self.log)
        start = time.monotonic()
        for i, text in enumerate(texts):
            event = {"event_id": f"{domain}-{i}", "text": text, "label": "x", "domain": domain}
            if request_ids[i]:
                event["request_id"] = request_ids[i]
            self.producer.send(self.topic, key=domain.encode(), value=json.dumps(event).encode())
        self.producer.flush()
        produced = time.monotonic() - start
        deadline = start + 600
        while len(self.log) < before + n and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - start
        applied = len(self.log) - before
        return {
            "events": n,
            "fast_path": fast_path,
            "applied": applied,
            "produce_seconds": produced,
            "seconds_to_applied": took,
            "events_per_s": applied / took,
        }

    def _drain(self, quiet_s: float = 2.0, limit_s: float = 300.0) -> None:
        """Wait until the memory stops growing, so a measurement does not count an earlier backlog."""
        deadline = time.monotonic() + limit_s
        last, since = len(self.log), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.2)
            now = len(self.log)
            if now != last:
                last, since = now, time.monotonic()

    def close(self) -> None:
        self.producer.close()


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback.json").write_text(json.dumps(result, indent=2))
    fix = result["fix"]
    ms = {k: fix["fix_seconds"].get(k, float("nan")) * 1000 for k in ("p50", "p99", "max")}
    lines = [
        "# driftserve bench feedback",
        "",
        f"- feedback at {fix['target_rate']:.0f} events/s (achieved {fix['achieved_rate']:.1f}) for "
        f"{fix['events']} events, {len(fix['replicas'])} replicas, {fix['sampled']} sampled",
        f"- feedback-to-fix on every replica: p50 {ms['p50']:.0f} ms, p99 {ms['p99']:.0f} ms, "
        f"max {ms['max']:.0f} ms; {fix['within_1s'] * 100:.1f}% within 1 s; "
        f"not fixed within timeout: {fix['not_fixed_within_timeout']}",
    ]
    idle = result.get("fix_idle")
    if idle is not None:
        ims = {k: idle["fix_seconds"].get(k, float("nan")) * 1000 for k in ("p50", "p90", "max")}
        lines.append(
            f"- feedback-to-fix when idle ({idle['sampled']} events a second apart): "
            f"p50 {ims['p50']:.0f} ms, p90 {ims['p90']:.0f} ms, max {ims['max']:.0f} ms; "
            f"not fixed within timeout: {idle['not_fixed_within_timeout']}"
        )
    for ing in result["ingestion"]:
        path = "request-id fast path" if ing["fast_path"] else "encoding texts"
        lines.append(f"- ingestion ({path}): {ing['events_per_s']:.0f} events/s ({ing['applied']} events)")
    (out / "feedback.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = sorted(fix["samples"])
    fig, ax = plt.subplots(figsize=(6, 4))
    if samples:
        ax.plot(
            [s * 1000 for s in samples],
            np.linspace(0, 1, len(samples)),
            drawstyle="steps-post",
            label=f"at {fix['target_rate']:.0f}/s",
        )
    idle_samples = sorted(idle["samples"]) if idle is not None else []
    if idle_samples:
        ax.plot(
            [s * 1000 for s in idle_samples],
            np.linspace(0, 1, len(idle_samples)),
            drawstyle="steps-post",
            label="idle, 1/s",
        )
    ax.axvline(1000, color="red", linestyle="--", label="1 s target")
    ax.set_xlabel("feedback-to-fix on every replica (ms)")
    ax.set_ylabel("fraction of sampled events")
    ax.set_title("feedback-to-fix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "feedback.png", dpi=120)
    plt.close(fig)


IDLE_EVENTS = 20  # one a second, each probed


def run(
    settings: Settings,
    out: Path,
    *,
    url: str | None,
    bootstrap: str | None,
    rate: float,
    duration: float,
    sample_every: int,
    ingest_events: int,
) -> dict[str, Any]:
    import contextlib

    with contextlib.ExitStack() as stack:
        if url is None:
            from ops.stack import EmbeddedStack

            url = stack.enter_context(EmbeddedStack(settings)).url
            bootstrap = settings.kafka_bootstrap
        bench = FeedbackBench(settings, url, bootstrap or settings.kafka_bootstrap)
        try:
            result = {
                "fix_idle": bench.fix_times(1.0, IDLE_EVENTS, 1, timeout=10.0),
                "fix": bench.fix_times(rate, duration, sample_every, timeout=10.0),
                "ingestion": [
                    bench.ingestion(ingest_events, fast_path=False),
                    bench.ingestion(min(ingest_events, 500), fast_path=True),
                ],
                "settings": {
                    "num_replicas": settings.num_replicas,
                    "sync_interval_s": settings.sync_interval_s,
                },
            }
        finally:
            bench.close()
    write_outputs(out, result)
    return result
