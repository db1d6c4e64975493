"""``driftserve demo``: the loop on shipped data, as a user would see it.

1. Labelled support tickets arrive as feedback; the domain becomes predictable at once.
2. A ticket of a kind never seen before is mispredicted; its label (a new class) is fed back, and the
   next prediction for a near-identical text is corrected by the error memory - timed.
3. The learner trains a LoRA adapter + head and registers it as a candidate; the rollout controller
   gates it, mirrors traffic to it (shadow), serves a share of traffic with it (canary) and promotes it,
   and the replicas hot-swap to it while requests keep being answered. The audit trail is printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from ops.stack import EmbeddedStack
from streams.redis_store import connect
from streams.registry_store import RegistryStore

DOMAIN = "support"
PROBE = "I'd like to request a refund because I was double charged"
PROBE_VARIANT = "I would like to request a refund since I was double charged"
NEW_LABEL = "refund_request"


def demo_events() -> list[dict]:
    text = (Path(__file__).parent / "data" / "demo.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _predict(client: httpx.Client, text: str) -> dict:
    r = client.post("/v1/predict", json={"text": text, "domain": DOMAIN})
    r.raise_for_status()
    return r.json()


def _feedback(client: httpx.Client, event: dict) -> None:
    body = {k: event[k] for k in ("text", "label", "domain")} | {"event_id": event["id"]}
    client.post("/v1/feedback", json=body).raise_for_status()


def run_demo(stack: EmbeddedStack, adapter_timeout_s: float = 300.0) -> int:
    events = demo_events()
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        first = _predict(client, PROBE)
        print(f"[1] before any feedback: label={first['label']} (the domain has no labels yet)")
        for e in events[:24]:
            _feedback(client, e)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and client.get("/healthz").json().get("memory_entries", 0) < 24:
            time.sleep(0.05)
        before = _predict(client, PROBE)
        print(f"[2] after 24 labelled tickets: '{PROBE}' -> {before['label']} (scores {before['scores']})")
        _feedback(client, {"id": "demo-probe", "text": PROBE, "label": NEW_LABEL, "domain": DOMAIN})
        sent = time.monotonic()
        after = before
        while time.monotonic() - sent < 10:
            after = _predict(client, PROBE_VARIANT)
            if after["label"] == NEW_LABEL:
                break
        fix_ms = (time.monotonic() - sent) * 1000
        ok = after["label"] == NEW_LABEL
        print(
            f"[3] fed back label '{NEW_LABEL}' (a class never seen before); a near-identical ticket "
            f"'{PROBE_VARIANT}' -> {after['label']} compensated={after['compensated']} "
            f"{fix_ms:.0f} ms after the feedback was accepted"
        )
        for e in events[24:]:
            _feedback(client, e)
        print(
            "[4] waiting for the learner to train a LoRA adapter (CPU: about a minute) and the rollout "
            "controller to gate, shadow, canary and promote it ..."
        )
        registry = RegistryStore(connect(stack.settings.redis()), stack.settings.redis())
        t0 = time.monotonic()
        served = None
        promoted = None
        answered = failed = 0
        while time.monotonic() - t0 < adapter_timeout_s:
            try:
                served = _predict(client, events[answered % len(events)]["text"])
                answered += 1
            except httpx.HTTPError:
                failed += 1
            promoted = registry.active().get(DOMAIN)
            if promoted and served and served["adapter"] == promoted:
                break
            time.sleep(0.25)
        if promoted and served and served["adapter"] == promoted:
            print(
                f"[5] adapter {promoted} promoted and hot-swapped in after {time.monotonic() - t0:.0f}s; "
                f"model_version={served['model_version']}; {answered} requests answered, {failed} failed "
                "meanwhile. Its audit trail:"
            )
            for e in registry.audit(DOMAIN):
                if e.version == promoted:
                    print(f"      {e.type:<10} by {e.actor}: {e.reason}")
            ok = ok and failed == 0
        else:
            print(f"[5] no promotion within {adapter_timeout_s:.0f}s (see {stack.state}/logs/)")
            ok = False
        metrics = client.get("/metrics").text
        wanted = ("driftserve_compensations_total", "driftserve_feedback_consumed_total")
        lines = [ln for ln in metrics.splitlines() if ln.startswith(wanted)]
        print("[6] metrics:\n    " + "\n    ".join(lines))
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1
