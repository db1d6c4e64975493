"""``driftserve replay STREAM``: argument parsing and the run, wired from the other replay modules.

Order matters for a fair, quick run on a small machine: embeddings for the baselines are computed
before the embedded stack starts (so encoding never competes with the system under test), the replay
follows, and the baselines replay the same events afterwards from the cached embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ops.replay.baselines import BASELINES, run_baselines
from ops.replay.embeddings import embed_texts
from ops.replay.pacing import Pacer
from ops.replay.report import SYSTEM, build_report, software, write_report
from ops.replay.runner import ReplayResult, ReplayRunner, RunnerConfig
from ops.replay.stream import Stream, StreamFormatError, read_stream, split_warmup
from ops.replay.transport import HttpPredictClient, KafkaFeedbackSink, TransportError
from ops.settings import Settings

STATE_MARKER = ".driftserve-replay-stack"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "stream", help="labelled stream, JSON Lines (.jsonl or .jsonl.gz); see docs/replay.md"
    )
    parser.add_argument("--url", help="driftserve to replay against; default: start the embedded stack")
    parser.add_argument(
        "--bootstrap", help="with --url: Kafka bootstrap servers for feedback [default: --kafka-bootstrap]"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="leading share sent as feedback only [default: 0.1]"
    )
    parser.add_argument(
        "--hide-domain", action="store_true", help="send predictions without their domain (adapter retrieval)"
    )
    parser.add_argument("--limit", type=int, help="replay only the first N events (in ts order)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="events per second [default: as fast as possible]")
    pace.add_argument(
        "--time-scale", type=float, help="follow the stream's timestamps, this many stream seconds per second"
    )
    parser.add_argument("--out", help="report directory [default: replay-results/<stream name>]")
    parser.add_argument("--seed", type=int, default=0, help="near-duplicate edits [default: 0]")
    parser.add_argument("--window", type=int, help="sliding window in events [default: n/10, 20..500]")
    parser.add_argument(
        "--fix-samples", type=int, default=20, help="errors followed to their fix [default: 20]"
    )
    parser.add_argument(
        "--fix-timeout", type=float, default=10.0, help="seconds per followed error [default: 10]"
    )
    parser.add_argument(
        "--rollout-probes",
        type=int,
        default=32,
        help="probe events per domain for rollout flips [default: 32]",
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        default=500,
        help="refresh the rollout probe set every N events [default: 500]",
    )
    parser.add_argument(
        "--wait-adapter",
        type=float,
        default=0.0,
        help="after the warm-up, wait up to this many seconds for every domain's first adapter [default: 0]",
    )
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help=f"comma separated [default: {','.join(BASELINES)}]"
    )
    parser.add_argument(
        "--retrains", type=int, default=10, help="refits of the retrain baseline [default: 10]"
    )
    parser.add_argument("--knn-k", type=int, default=10, help="k of the kNN baseline [default: 10]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(message: str, code: int = 2) -> int:
    print(f"driftserve replay: {message}", file=sys.stderr)
    return code


def _stream_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or "stream"


def _fresh_state_dir(out: Path) -> Path:
    """The embedded stack's state (Redis AOF, artifacts, buffers) must start empty, or feedback from an
    earlier run would leak labels into this one. Only a directory this command created is wiped."""
    state = out / "stack"
    if state.exists():
        if not (state / STATE_MARKER).exists() and any(state.iterdir()):
            raise ValueError(f"{state} exists and was not created by driftserve replay; choose another --out")
        shutil.rmtree(state)
    state.mkdir(parents=True)
    (state / STATE_MARKER).write_text("created by driftserve replay; wiped at the next run\n")
    return state


def _encoder(settings: Settings) -> Any:
    import torch

    from serving.encoder import Encoder

    device = settings.device if settings.device == "cpu" or torch.cuda.is_available() else "cpu"
    return Encoder(settings.model_path, device=device, max_length=settings.max_length)


def _wait_healthy(client: HttpPredictClient, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = client.health()
        if health is not None:
            return health
        time.sleep(1.0)
    raise TransportError("not_ready", f"{client.url}/healthz did not answer 200 within {timeout_s:.0f}s")


def _replay(args: argparse.Namespace, settings: Settings, stream: Stream, n_warmup: int, out: Path) -> Any:
    cfg = RunnerConfig(
        hide_domain=args.hide_domain,
        fix_samples=args.fix_samples,
        fix_timeout_s=args.fix_timeout,
        rollout_probe_size=args.rollout_probes,
        rollout_probe_every=args.probe_every,
        wait_adapter_s=args.wait_adapter,
        seed=args.seed,
    )
    pacer = Pacer(rate=args.rate, time_scale=args.time_scale)
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        target = settings
        if args.url:
            url, bootstrap = args.url, args.bootstrap or settings.kafka_bootstrap
        else:
            from ops.stack import EmbeddedStack

            target = settings.model_copy(update={"state_dir": _fresh_state_dir(out)})
            url, bootstrap = stack.enter_context(EmbeddedStack(target)).url, target.kafka_bootstrap
        start_s = time.monotonic() - t0
        client = HttpPredictClient(url)
        stack.callback(client.close)
        health = _wait_healthy(client)
        if health.get("memory_entries"):
            print(
                f"driftserve replay: warning: {url} already holds {health['memory_entries']} feedback "
                "entries; labels from earlier runs may leak into this one",
                file=sys.stderr,
            )
        kafka = dataclasses.replace(
            target.kafka(), bootstrap_servers=bootstrap, client_id="driftserve-replay"
        )
        sink = KafkaFeedbackSink(kafka)
        stack.callback(sink.close)
        runner = ReplayRunner(client, sink, cfg, pacer, progress=not args.no_progress)
        result = runner.run(stream.events, n_warmup)
        result.timings_s["stack_start"] = round(start_s, 3)
        return result, url, bootstrap


def _fix_similarity(result: ReplayResult, encoder: Any, embeddings: np.ndarray, n_warmup: int) -> None:
    if not result.fixes:
        return
    probes = encoder.encode([f.probe_text for f in result.fixes])
    for fix, vec in zip(result.fixes, probes, strict=True):
        fix.similarity = round(float(vec @ embeddings[n_warmup + fix.index]), 4)


def wait_adapter_warning(args: argparse.Namespace, settings: Settings) -> str | None:
    """The warm-up sends feedback and no requests, so a rollout that needs answers to judge its shadow and
    canary cannot promote anything during ``--wait-adapter`` on the embedded stack: say so up front."""
    if not args.wait_adapter or args.url or not settings.rollout_enabled or settings.canary_min_requests == 0:
        return None
    return (
        f"--wait-adapter {args.wait_adapter:g}: the warm-up sends no requests, and each rollout stage needs "
        f"canary_min_requests ({settings.canary_min_requests}) answers, so no adapter can be promoted "
        "during the wait; add --canary-min-requests 0 to let warm-up adapters through on the offline gate"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The ``replay`` subcommand; returns the exit code (0 done, 1 stopped early, 2 bad input/setup)."""
    produced_by = software()  # at the start: a checkout can change during a run of half an hour
    try:
        stream = read_stream(args.stream, limit=args.limit)
        n_warmup = split_warmup(stream.events, args.warmup)
        Pacer(rate=args.rate, time_scale=args.time_scale)  # validate before any slow work
        names = [b.strip() for b in args.baselines.split(",") if b.strip()]
        unknown = sorted(set(names) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
        if args.bootstrap and not args.url:
            raise ValueError("--bootstrap goes with --url (the embedded stack's broker: --kafka-bootstrap)")
        if args.url and not args.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")
    except (StreamFormatError, ValueError) as exc:
        return _fail(str(exc))
    warning = wait_adapter_warning(args, settings)
    if warning:
        print(f"driftserve replay: warning: {warning}", file=sys.stderr)
    out = Path(args.out or Path("replay-results") / _stream_name(args.stream))
    out.mkdir(parents=True, exist_ok=True)
    n_eval = len(stream.events) - n_warmup
    print(f"{stream.path}: {len(stream.events)} events, {n_warmup} warm-up, {n_eval} to evaluate", flush=True)

    t0 = time.monotonic()
    encoder = _encoder(settings)
    texts = [e.text for e in stream.events]
    embeddings = embed_texts(encoder, texts, out / "cache", progress=not args.no_progress)
    encode_s = time.monotonic() - t0

    from ops.stack import StackError

    try:
        result, url, bootstrap = _replay(args, settings, stream, n_warmup, out)
    except (ValueError, TransportError) as exc:
        return _fail(str(exc))
    except StackError as exc:  # the message says what to change
        return _fail(f"could not start the embedded stack: {exc}")

    t1 = time.monotonic()
    preds = run_baselines(
        embeddings,
        [e.label for e in stream.events],
        [None if args.hide_domain else e.domain for e in stream.events],
        n_warmup,
        retrains=args.retrains,
        k=args.knn_k,
        names=names,
    )
    _fix_similarity(result, encoder, embeddings, n_warmup)
    result.timings_s.update(encode=round(encode_s, 3), baselines=round(time.monotonic() - t1, 3))
    window = args.window or max(20, min(500, n_eval // 10))
    config = {
        "url": args.url or f"embedded ({url})",
        "bootstrap": bootstrap,
        "feedback_topic": settings.feedback_topic,
        "warmup_share": args.warmup,
        "hide_domain": args.hide_domain,
        "limit": args.limit,
        "seed": args.seed,
        "fix_samples": args.fix_samples,
        "fix_timeout_s": args.fix_timeout,
        "rollout_probes": args.rollout_probes,
        "probe_every": args.probe_every,
        "wait_adapter_s": args.wait_adapter,
        "retrains": args.retrains,
        "knn_k": args.knn_k,
        "settings": settings.model_dump(mode="json") if not args.url else None,
    }
    help_text = {n: BASELINES[n].format(retrains=args.retrains, k=args.knn_k) for n in names}
    report = build_report(
        stream=stream,
        n_warmup=n_warmup,
        result=result,
        baselines=preds,
        baseline_help=help_text,
        config=config,
        window=window,
        produced_by=produced_by,
    )
    paths = write_report(report, out, result, preds)
    _print_summary(report, paths)
    return 1 if result.aborted else 0


def _print_summary(report: dict[str, Any], paths: list[Path]) -> None:
    print()
    for name, v in report["systems"].items():
        mark = "  <- under test" if name == SYSTEM else ""
        acc, f1 = v["accuracy"], v["macro_f1"]
        print(
            f"  {name:<11} accuracy {acc if acc is None else f'{acc:.3f}'}  macro-F1 "
            f"{f1 if f1 is None else f'{f1:.3f}'}{mark}"
        )
    bar = report["bar"]
    if "delta_points" in bar:
        print(f"  vs best baseline ({bar['best_baseline']}): {bar['delta_points']:+.2f} points")
    fix = report["feedback_to_fix"]
    print(
        f"  feedback-to-fix: {fix['fixed']}/{fix['followed']} fixed, p50 "
        f"{fix['seconds']['p50'] if fix['seconds']['p50'] is None else round(fix['seconds']['p50'], 2)} s; "
        f"rollouts seen: {len(report['rollouts'])}; latency p50 {report['latency_ms']['p50']} ms, "
        f"p99 {report['latency_ms']['p99']} ms; errors: {report['errors']['total']}"
    )
    if report["aborted"]:
        print(f"  stopped early: {report['aborted']}")
    print("report: " + ", ".join(str(p) for p in paths))
