"""``driftserve bench serve``: serving throughput and latency on this machine, against a naive Ray Serve
deployment of the same model in the same Ray cluster and run.

- naive: one Hugging Face forward per request (tokenize, MiniLM, mean pooling, a linear head), no
  batching, no memory, the same number of replicas and CPUs;
- driftserve: the real app with dynamic batching, compensation over ``memory_entries`` stored feedback
  entries and adapter retrieval on (requests name no domain).

Closed-loop load at increasing concurrency; for each system the best throughput whose p99 stays within
``p99_budget_ms`` is its capacity, and the report gives capacity(driftserve) / capacity(naive). For
every driftserve level the report also says where a batch's time went, from the replica's own stage
histograms read before and after the level: the model's forward for the memory keys (encode), routing
(retrieval) and memory search + online experts + compensation (compensation, per domain group). Under
load these include waiting for the shared cores.

Every level also says where the machine's CPU went (Linux ``/proc``: user + system time of every process
before and after the level), in ms per answered request: the measured system's replicas, Serve's HTTP
proxy, the load generator (this process) and everything else (Ray's own processes, the broker, Redis,
the memory writer...), and how many cores were busy in all. Both systems share one machine, so a
capacity ratio is bounded by what the proxy and the load generator take per request as well.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ops.settings import Settings

NAIVE_ROUTE = "/naive"
STAGES = ("encode", "retrieval", "compensation")
# Ray titles its workers by actor (and current method): the replicas and the proxy are found by these.
CPU_ROLES = {"driftserve": "ServeReplica:driftserve", "naive": "ServeReplica:naive", "proxy": "ProxyActor"}


def process_cpu(proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """Every process's command line and CPU seconds so far (user + system); {} without ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, tuple[str, float]] = {}
    try:
        entries = list(proc.iterdir())
    except OSError:
        return out
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 0, utime 11, stime 12
        out[int(entry.name)] = (cmdline, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_report(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    system: str,
    requests: int,
    elapsed_s: float,
    own_pid: int,
) -> dict[str, float]:
    """ms of CPU per answered request between two ``process_cpu`` reads, by role: ``replica`` (the
    measured system's), ``other_replica`` (the other system's, idle but not free), ``proxy``,
    ``load_generator`` and ``rest``; and ``cores_busy`` (CPU seconds per second, all processes)."""
    roles = {"replica": 0.0, "other_replica": 0.0, "proxy": 0.0, "load_generator": 0.0, "rest": 0.0}
    for pid, (cmdline, seconds) in after.items():
        used = seconds - before.get(pid, ("", 0.0))[1]
        if used <= 0:
            continue
        if pid == own_pid:
            role = "load_generator"
        elif CPU_ROLES[system] in cmdline:
            role = "replica"
        elif any(CPU_ROLES[s] in cmdline for s in ("driftserve", "naive")):
            role = "other_replica"
        elif CPU_ROLES["proxy"] in cmdline:
            role = "proxy"
        else:
            role = "rest"
        roles[role] += used
    total = sum(roles.values())
    out = {f"{k}_ms_per_request": 1000 * v / requests if requests else 0.0 for k, v in roles.items()}
    out["total_ms_per_request"] = 1000 * total / requests if requests else 0.0
    out["cores_busy"] = total / elapsed_s if elapsed_s > 0 else 0.0
    return out


def naive_app(model_path: str | None, num_replicas: int, num_cpus: float):
    """A plain Serve deployment of the same encoder: what a team would write first."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    class Naive:
        def __init__(self, path: str | None) -> None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            from serving.encoder import default_model_path

            path = path or default_model_path()
            self.torch = torch
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
            gen = torch.Generator().manual_seed(0)
            self.head = torch.randn(3, self.model.config.hidden_size, generator=gen)
            self.labels = ["a", "b", "c"]

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            torch = self.torch
            with torch.inference_mode():
                batch = self.tokenizer([body["text"]], truncation=True, max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                probs = torch.softmax(emb @ self.head.T, dim=-1)[0]
            return {"label": self.labels[int(probs.argmax())], "scores": probs.tolist()}

    return Naive.bind(model_path)


def _texts(n: int, seed: int) -> list[str]:
    from serving.encoder import default_model_path

    vocab = [w for w in (Path(default_model_path()) / "vocab.txt").read_text().split() if w.isalpha()]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=int(rng.integers(8, 30)))) for _ in range(n)]


def load(url: str, texts: list[str], concurrency: int, duration_s: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients send one request after another for ``duration_s``."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(seed: int) -> None:
        nonlocal errors
        i = seed
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    r = c.post(url, json={"text": texts[i % len(texts)]})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(took)
                    else:
                        errors += 1
                i += concurrency

    threads = [threading.Thread(target=client, args=(s,)) for s in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def stage_totals(metrics_text: str) -> dict[str, float]:
    """Cumulative seconds and counts per serving stage, and batches and texts, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in ("driftserve_stage_latency_seconds", "driftserve_batch_size"):
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind not in ("sum", "count"):
                continue
            if family.name == "driftserve_batch_size":
                key = "texts" if kind == "sum" else "batches"
            else:
                key = f"{sample.labels['stage']}_{'s' if kind == 'sum' else 'n'}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


def stage_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Per batch served between two ``stage_totals``: mean size, ms per stage, domain groups, and routing +
    compensation as a share of the encode stage."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    batches = delta.get("batches", 0.0)
    if batches <= 0:
        return {"batches": 0}
    report: dict[str, Any] = {"batches": int(batches), "mean_batch": delta.get("texts", 0.0) / batches}
    for stage in STAGES:
        report[f"{stage}_ms_per_batch"] = 1000 * delta.get(f"{stage}_s", 0.0) / batches
    report["groups_per_batch"] = delta.get("compensation_n", 0.0) / batches
    encode = delta.get("encode_s", 0.0)
    extra = delta.get("retrieval_s", 0.0) + delta.get("compensation_s", 0.0)
    report["retrieval_compensation_share_of_encode"] = extra / encode if encode > 0 else None
    return report


def capacity(levels: list[dict[str, Any]], budget_ms: float) -> float:
    ok = [lv["throughput_rps"] for lv in levels if lv["p99_ms"] <= budget_ms and lv["errors"] == 0]
    return max(ok) if ok else 0.0


def seed_memory(base_url: str, settings: Settings, entries: int, domains: int = 4) -> int:
    """Fill the error memory through the real feedback path (Kafka -> memory writer), and return once the
    writer has committed every seeded event: a writer still busy would take CPU from whatever is measured
    next. Event ids are new each run (the embedded Redis keeps its data between runs, so the memory
    served can be larger than ``entries``: the entries every replica holds are returned)."""
    import uuid

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from serving.feedback_writer import GROUP_ROLE as WRITER_ROLE

    run = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=base_url, timeout=30) as c:
        before = max(c.get("/healthz").json()["memory_entries"] for _ in range(4))
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20)
    texts = _texts(entries, seed=5)
    sent = []
    for i, text in enumerate(texts):
        event = {
            "event_id": f"bench-serve-{run}-{i}",
            "text": text,
            "label": f"l{i % 5}",
            "domain": f"dom{i % domains}",
        }
        sent.append(producer.send(settings.feedback_topic, value=json.dumps(event).encode()))
    producer.flush()
    ends: dict[TopicPartition, int] = {}
    for future in sent:
        md = future.get(timeout=60)
        tp = TopicPartition(md.topic, md.partition)
        ends[tp] = max(ends.get(tp, 0), md.offset + 1)
    producer.close()
    kafka = settings.kafka()
    probe = KafkaConsumer(
        **kafka.client_kwargs(), group_id=kafka.group(WRITER_ROLE), enable_auto_commit=False
    )
    try:
        with httpx.Client(base_url=base_url, timeout=30) as c:
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                committed = all((probe.committed(tp) or 0) >= end for tp, end in ends.items())
                held = min(c.get("/healthz").json()["memory_entries"] for _ in range(4))
                if committed and held >= before + entries:
                    return held
                time.sleep(1.0)
    finally:
        probe.close()
    raise TimeoutError("the memory writer did not apply the seed entries in time")


def _stages(base_url: str) -> dict[str, float]:
    return stage_totals(httpx.get(f"{base_url}/metrics", timeout=30).text)


def run(
    settings: Settings,
    out: Path,
    *,
    levels: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32),
    duration_s: float = 15.0,
    memory_entries: int = 2000,
    p99_budget_ms: float = 100.0,
) -> dict[str, Any]:
    from ray import serve

    from ops.stack import EmbeddedStack

    result: dict[str, Any] = {
        "levels": list(levels),
        "duration_s": duration_s,
        "p99_budget_ms": p99_budget_ms,
        "memory_entries": memory_entries,
        "num_replicas": settings.num_replicas,
    }
    with EmbeddedStack(settings, learner=False) as stack:
        serve.run(
            naive_app(settings.model_path, settings.num_replicas, settings.replica_num_cpus),
            name="naive",
            route_prefix=NAIVE_ROUTE,
        )
        result["memory_entries_served"] = seed_memory(stack.url, settings, memory_entries)
        texts = _texts(500, seed=9)
        for name, url in (("naive", f"{stack.url}{NAIVE_ROUTE}"), ("driftserve", f"{stack.url}/v1/predict")):
            load(url, texts, 2, 3.0)  # warm-up
            result[name] = []
            for c in levels:
                before = _stages(stack.url) if name == "driftserve" else None
                cpu_before, began = process_cpu(), time.monotonic()
                level = load(url, texts, c, duration_s)
                if cpu_before:
                    level["cpu"] = cpu_report(
                        cpu_before,
                        process_cpu(),
                        name,
                        level["requests"],
                        time.monotonic() - began,
                        os.getpid(),
                    )
                if before is not None:
                    level["stages"] = stage_report(before, _stages(stack.url))
                result[name].append(level)
        result["capacity_rps"] = {n: capacity(result[n], p99_budget_ms) for n in ("naive", "driftserve")}
        naive_cap = result["capacity_rps"]["naive"]
        result["ratio"] = result["capacity_rps"]["driftserve"] / naive_cap if naive_cap else float("inf")
        result["single_client_p50_ms"] = {n: result[n][0]["p50_ms"] for n in ("naive", "driftserve")}
    write_outputs(out, result)
    return result


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    cap = result["capacity_rps"]
    lines = [
        "# driftserve bench serve",
        "",
        f"capacity at p99 <= {result['p99_budget_ms']:.0f} ms: "
        f"driftserve {cap['driftserve']:.1f} req/s, naive {cap['naive']:.1f} req/s, "
        f"ratio {result['ratio']:.2f}",
        "",
        f"error memory: {result.get('memory_entries_served', result['memory_entries'])} entries served "
        f"({result['memory_entries']} seeded by this run); {result['duration_s']:.0f} s per level",
        "",
        "| system | concurrency | req/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("naive", "driftserve"):
        for lv in result[name]:
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['throughput_rps']:.1f} | {lv['p50_ms']:.1f} | "
                f"{lv['p99_ms']:.1f} | {lv['errors']} |"
            )
    cpu = [(name, lv) for name in ("naive", "driftserve") for lv in result[name] if lv.get("cpu")]
    if cpu:
        lines += [
            "",
            "where the machine's CPU went, ms per answered request (every process, from /proc):",
            "",
            "| system | concurrency | its replica | Serve proxy | load generator | other replica | rest | "
            "total | cores busy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, lv in cpu:
            c = lv["cpu"]
            lines.append(
                f"| {name} | {lv['concurrency']} | {c['replica_ms_per_request']:.2f} | "
                f"{c['proxy_ms_per_request']:.2f} | {c['load_generator_ms_per_request']:.2f} | "
                f"{c['other_replica_ms_per_request']:.2f} | {c['rest_ms_per_request']:.2f} | "
                f"{c['total_ms_per_request']:.2f} | {c['cores_busy']:.2f} |"
            )
    staged = [lv for lv in result["driftserve"] if lv.get("stages", {}).get("batches")]
    if staged:
        lines += [
            "",
            "where a driftserve batch's time went (replica stage histograms, per batch):",
            "",
            "| concurrency | batches | texts per batch | encode ms | retrieval ms | compensation ms | "
            "domain groups | (retrieval + compensation) / encode |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for lv in staged:
            st = lv["stages"]
            share = st["retrieval_compensation_share_of_encode"]
            lines.append(
                f"| {lv['concurrency']} | {st['batches']} | {st['mean_batch']:.2f} | "
                f"{st['encode_ms_per_batch']:.2f} | {st['retrieval_ms_per_batch']:.2f} | "
                f"{st['compensation_ms_per_batch']:.2f} | {st['groups_per_batch']:.2f} | "
                + (f"{100 * share:.1f}% |" if share is not None else "- |")
            )
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("naive", "driftserve"):
        ax.plot(
            [lv["throughput_rps"] for lv in result[name]],
            [lv["p99_ms"] for lv in result[name]],
            "o-",
            label=name,
        )
    ax.axhline(result["p99_budget_ms"], color="red", linestyle="--", label="p99 budget")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)
    plt.close(fig)
