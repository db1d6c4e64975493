"""``driftserve bench transfer``: a base-model migration measured on one labelled stream, in-process.

Protocol (serving's own Predictor, memory compensation as configured):

1. History: ``history`` events after the first ``start`` are feedback. The error memory holds all of
   them (it is rebuilt from the log); the replay buffer keeps the newest ``buffer_capacity``; the old
   base's adapter + head is trained on the buffer, as the learner does.
2. Migration at the end of the history, using only the buffer: the adapter is transferred to the new base
   (``learners.transfer``), and the memory is re-keyed with the new base (what ``Rebuilder`` does from
   the log). For a same-architecture update the adapter is also carried over unchanged (``republish``).
3. The next ``evaluate`` events are replayed prequentially in batches: each system predicts, then the
   labels are written to its memory (keys of its own base). Accuracy per window of ``window`` events.

Systems (each with and without memory compensation where it matters):

* ``old``: old base + its adapter + old-key memory (what would have gone on serving);
* ``new_transfer``: new base + transferred adapter + re-keyed memory; ``empty_memory``: the same
  after a switch that does not re-key (the memory under the new fingerprint starts empty);
* ``new_retrain``: new base + an adapter trained from scratch on the buffer (the alternative that
  reuses the buffered raw data directly, for reference);
* ``same_arch_direct`` / ``same_arch_transfer``: the same-architecture base with the old adapter carried
  over unchanged / distilled from it, with the old-key memory kept (``stale_memory``), re-keyed, or off.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from learners import artifacts
from learners.buffer import ReplayBuffers
from learners.trainer import TrainConfig, train_adapter
from learners.transfer import TransferConfig, publish_transfer, republish, transfer_adapter
from ops.replay.stream import StreamEvent, read_stream
from serving.artifacts import Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.memory import InProcessMemory
from serving.predictor import Predictor
from streams.redis_store import MemoryEntry
from streams.schemas import DEFAULT_DOMAIN, FeedbackEvent


@dataclass(frozen=True)
class TransferBench:
    start: int = 0  # events skipped before the history (a window where the labels are mixed)
    history: int = 8000
    evaluate: int = 4000
    buffer_capacity: int = 2000
    window: int = 500
    batch: int = 32
    device: str = "cpu"
    max_length: int = 128
    old_model: str | None = None  # default: the bundled MiniLM
    new_model: str | None = "all-mpnet-base-v2"
    same_arch_model: str | None = "sre-embedding-model"
    retrain_reference: bool = True
    teacher_artifact: str | None = None
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, max_steps=400, batch_size=16))
    transfer: TransferConfig = field(default_factory=TransferConfig)
    comp: CompensationConfig = field(default_factory=CompensationConfig)


def _domain(e: StreamEvent) -> str:
    return e.domain or DEFAULT_DOMAIN


def _memory(encoder: Encoder, events: list[StreamEvent], keys: np.ndarray | None = None) -> InProcessMemory:
    memory = InProcessMemory(encoder.dim)
    if events:
        keys = encoder.encode([e.text for e in events]) if keys is None else keys
        version = encoder.fingerprint[:12]
        memory.add(
            [MemoryEntry(e.id, _domain(e), e.label, keys[i], e.ts, version) for i, e in enumerate(events)]
        )
    return memory


@dataclass
class _Variant:
    name: str
    memory: InProcessMemory | None  # None: compensation off
    correct: list[bool] = field(default_factory=list)


class _BatchMemo:
    """Remembers an encoder's outputs for the batch in flight, so memory variants of one system (and
    systems on one base, which share the memory key pass) do not pay for the same forward twice. Only the
    bench installs it; serving never does."""

    def __init__(self, encoder: Encoder) -> None:
        self._encode = encoder.encode
        self._cache: dict[tuple[tuple[str, ...], str | None], np.ndarray] = {}
        encoder.encode = self  # type: ignore[method-assign]

    def __call__(self, texts, adapter: str | None = None) -> np.ndarray:
        key = (tuple(texts), adapter)
        if key not in self._cache:
            self._cache[key] = self._encode(texts, adapter)
        return self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


class _System:
    """One Predictor (encoder + active adapters); variants swap its memory and compensation."""

    def __init__(
        self, name: str, encoder: Encoder, adapters: list[Artifact], variants: list[_Variant], comp
    ) -> None:
        self.name = name
        self.comp_on, self.comp_off = comp, replace(comp, enabled=False)
        self.predictor = Predictor(encoder, InProcessMemory(encoder.dim), comp)
        for artifact in adapters:
            self.predictor.activate(artifact)
        self.variants = variants
        self.seconds = 0.0

    def step(self, batch: list[StreamEvent]) -> None:
        t0 = time.perf_counter()
        texts, domains = [e.text for e in batch], [_domain(e) for e in batch]
        keys = None
        for v in self.variants:
            self.predictor.memory = v.memory if v.memory is not None else InProcessMemory(1)
            self.predictor.comp = self.comp_on if v.memory is not None else self.comp_off
            preds = self.predictor.predict(texts, domains)
            v.correct += [p.label == e.label for p, e in zip(preds, batch, strict=True)]
            keys = np.stack([p.key for p in preds])
        # Test-then-train: the labels reach every memory after the batch was answered.
        version = self.predictor.base_version
        entries = [
            MemoryEntry(e.id, _domain(e), e.label, keys[i], e.ts, version) for i, e in enumerate(batch)
        ]
        seen: set[int] = set()
        for v in self.variants:
            if v.memory is not None and id(v.memory) not in seen:
                seen.add(id(v.memory))
                v.memory.add(entries)
        self.seconds += time.perf_counter() - t0


def _windows(correct: list[bool], size: int) -> list[float]:
    return [float(np.mean(correct[i : i + size])) for i in range(0, len(correct), size)]


def _teacher(enc: Encoder, examples, cfg: TrainConfig, root: Path) -> Artifact:
    by_domain: dict[str, list] = {}
    for domain, ex in examples:
        by_domain.setdefault(domain, []).append(ex)
    if len(by_domain) != 1:
        raise ValueError("bench transfer measures one domain; the stream has several")
    ((domain, rows),) = by_domain.items()
    trained = train_adapter(enc, [e.text for e in rows], [e.label for e in rows], cfg)
    return artifacts.publish_trained(root, enc, domain, trained, cfg)


def run(stream: Path, out: Path, cfg: TransferBench) -> dict[str, Any]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    events = read_stream(stream).events
    hist = events[cfg.start : cfg.start + cfg.history]
    test = events[cfg.start + cfg.history : cfg.start + cfg.history + cfg.evaluate]
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    buffers = ReplayBuffers(work / "buffers", capacity=cfg.buffer_capacity)
    buffers.add(
        [FeedbackEvent(event_id=e.id, text=e.text, label=e.label, domain=_domain(e), ts=e.ts) for e in hist]
    )
    domain = buffers.domains()[0]
    buffered = buffers.examples(domain)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "stream": str(stream),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("teacher", "transfer", "comp")},
        "teacher_config": asdict(cfg.teacher),
        "transfer_config": asdict(cfg.transfer),
        "compensation": asdict(cfg.comp),
        "history_events": len(hist),
        "evaluated_events": len(test),
        "buffered_examples": len(buffered),
        "buffer_labels": {
            lab: sum(e.label == lab for e in buffered) for lab in sorted({e.label for e in buffered})
        },
    }

    def enc(path: str | None) -> Encoder:
        return Encoder(path, device=cfg.device, max_length=cfg.max_length)

    t = time.monotonic()
    old = enc(cfg.old_model)
    if cfg.teacher_artifact:  # an earlier run's teacher on the same buffer: only the transfer is re-run
        teacher = load_artifact(cfg.teacher_artifact, base_fingerprint=old.fingerprint, dim=old.dim)
        result["teacher_artifact"] = cfg.teacher_artifact
    else:
        teacher = _teacher(old, [(domain, e) for e in buffered], cfg.teacher, out / "artifacts")
    timings["teacher_train_s"] = time.monotonic() - t
    t = time.monotonic()
    old_keys = old.encode([e.text for e in hist])
    timings["old_memory_keys_s"] = time.monotonic() - t
    systems = [
        _System(
            "old",
            old,
            [teacher],
            [_Variant("memory", _memory(old, hist, old_keys)), _Variant("no_memory", None)],
            cfg.comp,
        )
    ]
    transfers: dict[str, dict[str, float]] = {}
    if cfg.new_model:
        new = enc(cfg.new_model)
        t = time.monotonic()
        res = transfer_adapter(old, teacher, new, buffered, cfg.transfer)
        student = publish_transfer(work / "artifacts", teacher, res, new, cfg.transfer)
        timings["new_transfer_s"] = time.monotonic() - t
        transfers["new_transfer"] = res.report
        t = time.monotonic()
        new_keys = new.encode([e.text for e in hist])  # the re-key: what Rebuilder does from the log
        rekeyed = _memory(new, hist, new_keys)
        timings["new_rekey_s"] = time.monotonic() - t
        systems.append(
            _System(
                "new_transfer",
                new,
                [student],
                [
                    _Variant("rekeyed_memory", rekeyed),
                    _Variant("empty_memory", InProcessMemory(new.dim)),
                    _Variant("no_memory", None),
                ],
                cfg.comp,
            )
        )
        if cfg.retrain_reference:
            t = time.monotonic()
            scratch = _teacher(new, [(domain, e) for e in buffered], cfg.teacher, work / "artifacts-retrain")
            timings["new_retrain_s"] = time.monotonic() - t
            systems.append(
                _System(
                    "new_retrain",
                    new,
                    [scratch],
                    [_Variant("rekeyed_memory", _memory(new, hist, new_keys))],
                    cfg.comp,
                )
            )
    if cfg.same_arch_model:
        same = enc(cfg.same_arch_model)
        direct = republish(work / "artifacts-same", teacher, same)
        t = time.monotonic()
        res = transfer_adapter(old, teacher, same, buffered, cfg.transfer)
        distilled = publish_transfer(work / "artifacts-same", teacher, res, same, cfg.transfer)
        timings["same_arch_transfer_s"] = time.monotonic() - t
        transfers["same_arch_transfer"] = res.report
        same_keys = same.encode([e.text for e in hist])
        systems.append(
            _System(
                "same_arch_direct",
                same,
                [direct],
                [
                    _Variant("stale_memory", _memory(old, hist, old_keys)),
                    _Variant("rekeyed_memory", _memory(same, hist, same_keys)),
                    _Variant("no_memory", None),
                ],
                cfg.comp,
            )
        )
        systems.append(
            _System(
                "same_arch_transfer",
                same,
                [distilled],
                [_Variant("rekeyed_memory", _memory(same, hist, same_keys)), _Variant("no_memory", None)],
                cfg.comp,
            )
        )
    memos = {id(s.predictor.encoder): s.predictor.encoder for s in systems}
    memos = {k: _BatchMemo(e) for k, e in memos.items()}
    for start in range(0, len(test), cfg.batch):
        batch = test[start : start + cfg.batch]
        for system in systems:
            system.step(batch)
        for memo in memos.values():
            memo.clear()
    table: dict[str, Any] = {}
    for system in systems:
        for v in system.variants:
            table[f"{system.name}/{v.name}"] = {
                "accuracy": float(np.mean(v.correct)),
                "windows": _windows(v.correct, cfg.window),
            }
        timings[f"replay_{system.name}_s"] = system.seconds
    result |= {
        "transfers": transfers,
        "results": table,
        "timings": timings,
        "seconds": time.monotonic() - started,
        "device": cfg.device,
    }
    (out / "transfer.json").write_text(json.dumps(result, indent=2))
    (out / "transfer.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = result["results"]
    n_windows = max(len(r["windows"]) for r in rows.values())
    size = result["config"]["window"]
    head = ["system / memory", "accuracy"] + [f"w{i + 1}" for i in range(n_windows)]
    lines = [
        f"# Base-model migration on {Path(result['stream']).name}",
        "",
        f"history {result['history_events']} events (buffer kept {result['buffered_examples']}), then "
        f"{result['evaluated_events']} events prequentially in windows of {size}; device {result['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in rows.items():
        cells = [name, f"{r['accuracy']:.4f}"] + [f"{w:.3f}" for w in r["windows"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Transfers (held-out newest buffered examples):", ""]
    for name, rep in result["transfers"].items():
        keys = ("teacher_accuracy", "holdout_accuracy", "agreement", "nfr", "pfr", "transfer_synthetic_kept")
        lines.append(f"- {name}: " + ", ".join(f"{k} {rep[k]:.3f}" for k in keys if k in rep))
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()), ""]
    return "\n".join(lines)
