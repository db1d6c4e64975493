"""``driftserve bench transfer``: a base-model migration measured on one labelled stream, in-process.

Protocol (serving's own Predictor, memory compensation as configured):

1. History: ``history`` events after the first ``start`` are feedback. The error memory holds all of
   them (it is rebuilt from the log); the replay buffer keeps the newest ``buffer_capacity``; the old
   base's adapter + head is trained on the buffer as the learner does: on all but the newest
   ``holdout_frac``, with its memory weight and compensation floor fitted on those
   (``learners.transfer.fit_serving``, the values ``evaluate_candidate`` ships).
2. Migration at the end of the history, using only the buffer: the adapter is transferred to the new base
   (``learners.transfer``, which fits the student's memory weight and floor for the new base on the
   buffer's holdout), and the memory is re-keyed with the new base (what ``Rebuilder`` does from the
   log). For a same-architecture update the adapter is also carried over unchanged (``republish``, and
   refitted the same way). Every system serves with what its artifact carries.
3. The next ``evaluate`` events are replayed prequentially in batches: each system predicts, then the
   labels are written to its memory (keys of its own base). Accuracy per window of ``window`` events.

``evaluate`` 0 stops after step 2 (artifacts under ``out/artifacts``); ``teacher_artifact`` and
``student_artifact`` reuse them, so a slow migration and its replay can run as separate commands.

Systems (each with and without memory compensation where it matters):

* ``old``: old base + its adapter + old-key memory (what would have gone on serving);
* ``new_transfer``: new base + transferred adapter + re-keyed memory; ``empty_memory``: the same
  after a switch that does not re-key (the memory under the new fingerprint starts empty);
* ``…@defaults``: the same adapter and memory with the deployment's defaults instead of the fitted
  memory weight and floor (the ablation of the serving calibration);
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
from learners.buffer import Example, ReplayBuffers
from learners.evaluation import with_metrics
from learners.trainer import TrainConfig, train_adapter
from learners.transfer import (
    TransferConfig,
    calibrated,
    fit_serving,
    publish_transfer,
    republish,
    transfer_adapter,
)
from ops.replay.stream import StreamEvent, read_stream
from serving.artifacts import Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.memory import InProcessMemory
from serving.mixing import Outcome, ServedMix
from serving.predictor import Prediction, Predictor, memory_weight
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
    student_artifact: str | None = None  # an earlier run's transferred adapter (new_model's base)
    holdout_frac: float = 0.2  # the learner's: the newest share of the buffer fits the teacher's serving
    teacher: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=3, max_steps=400, batch_size=16, lora_layers=None, max_length=None
        )
    )  # as docs/migration.md measured it
    transfer: TransferConfig = field(default_factory=TransferConfig)
    comp: CompensationConfig = field(default_factory=CompensationConfig)
    online_mix: bool = True  # labels carry what head and memory said, as in serving (False: fixed weight)


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
    adapters: list[Artifact] | None = None  # served instead of the system's (same weights, other metrics)
    correct: list[bool] = field(default_factory=list)


def uncalibrated(artifact: Artifact) -> Artifact:
    """The same adapter with the deployment's defaults instead of its fitted serving calibration: the
    ablation that shows what the fit changed."""
    return calibrated(artifact, {}, suffix="defaults")


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
        self,
        name: str,
        encoder: Encoder,
        adapters: list[Artifact],
        variants: list[_Variant],
        comp,
    ) -> None:
        self.name = name
        self.online_mix = True
        self.comp_on, self.comp_off = comp, replace(comp, enabled=False)
        self.predictor = Predictor(encoder, InProcessMemory(encoder.dim), comp)
        self.adapters = adapters
        self.variants = variants
        self.seconds = 0.0

    def step(self, batch: list[StreamEvent]) -> None:
        t0 = time.perf_counter()
        texts, domains = [e.text for e in batch], [_domain(e) for e in batch]
        answered: dict[int, tuple[InProcessMemory, list[Prediction]]] = {}
        for v in self.variants:
            for artifact in v.adapters or self.adapters:
                self.predictor.activate(artifact)
            self.predictor.memory = v.memory if v.memory is not None else InProcessMemory(1)
            self.predictor.comp = self.comp_on if v.memory is not None else self.comp_off
            preds = self.predictor.predict(texts, domains)
            v.correct += [p.label == e.label for p, e in zip(preds, batch, strict=True)]
            if v.memory is not None:
                answered.setdefault(id(v.memory), (v.memory, preds))
        # Test-then-train: the labels reach every memory after the batch was answered, each with what
        # that memory's own answers mixed (serving.mixing), as the memory writer logs them.
        version = self.predictor.base_version
        for memory, preds in answered.values():
            memory.add(
                [
                    MemoryEntry(
                        e.id,
                        _domain(e),
                        e.label,
                        preds[i].key,
                        e.ts,
                        version,
                        mix=_outcome(preds[i], e.label) if self.online_mix else None,
                    )
                    for i, e in enumerate(batch)
                ]
            )
        self.seconds += time.perf_counter() - t0


def _windows(correct: list[bool], size: int) -> list[float]:
    return [float(np.mean(correct[i : i + size])) for i in range(0, len(correct), size)]


def split(examples: list[Example], holdout_frac: float) -> tuple[list[Example], list[Example]]:
    """(train, hold) by time, as the learner splits a snapshot."""
    rows = sorted(examples, key=lambda e: e.ts)
    n_hold = int(len(rows) * holdout_frac)
    return (rows[:-n_hold], rows[-n_hold:]) if n_hold else (rows, [])


def _teacher(enc: Encoder, domain: str, rows: list[Example], cfg: TrainConfig, root: Path) -> Artifact:
    trained = train_adapter(enc, [e.text for e in rows], [e.label for e in rows], cfg)
    return artifacts.publish_trained(root, enc, domain, trained)


def _fitted(enc: Encoder, comp: CompensationConfig, artifact: Artifact, train, hold) -> Artifact:
    return with_metrics(artifact, **fit_serving(enc, comp, artifact, train, hold))


def _serving_metrics(artifact: Artifact) -> dict[str, float]:
    m = artifact.manifest.metrics
    keys = ("memory_weight", "compensation_sim_low", "calibration_wins", "calibration_losses")
    return {k: m[k] for k in keys if k in m}


def run(stream: Path, out: Path, cfg: TransferBench) -> dict[str, Any]:
    """Scratch (the replay buffer, artifacts the report does not keep) lives in a temporary directory
    removed at the end, whatever happens; what the report names is under ``out``."""
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch:
        return _run(stream, out, cfg, Path(scratch))


def _run(stream: Path, out: Path, cfg: TransferBench, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    events = read_stream(stream).events
    hist = events[cfg.start : cfg.start + cfg.history]
    test = events[cfg.start + cfg.history : cfg.start + cfg.history + cfg.evaluate]
    buffers = ReplayBuffers(work / "buffers", capacity=cfg.buffer_capacity)
    buffers.add(
        [FeedbackEvent(event_id=e.id, text=e.text, label=e.label, domain=_domain(e), ts=e.ts) for e in hist]
    )
    if len(buffers.domains()) != 1:
        raise ValueError("bench transfer measures one domain; the stream has several")
    domain = buffers.domains()[0]
    buffered = buffers.examples(domain)
    train, hold = split(buffered, cfg.holdout_frac)
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
        teacher = _teacher(old, domain, train, cfg.teacher, out / "artifacts")
    timings["teacher_train_s"] = time.monotonic() - t
    t = time.monotonic()
    teacher = _fitted(old, cfg.comp, teacher, train, hold)
    timings["teacher_fit_s"] = time.monotonic() - t
    result["artifacts"] = {"teacher": str(teacher.path)}
    serving = {"old": _serving_metrics(teacher)}
    result["serving_calibration"] = serving
    transfers: dict[str, dict[str, float]] = {}
    if cfg.new_model:
        new = enc(cfg.new_model)
        t = time.monotonic()
        if cfg.student_artifact:
            student = load_artifact(cfg.student_artifact, base_fingerprint=new.fingerprint, dim=new.dim)
            result["artifacts"]["student_reused"] = cfg.student_artifact
        else:
            res = transfer_adapter(old, teacher, new, buffered, cfg.transfer)
            student = publish_transfer(out / "artifacts", teacher, res, new, cfg.transfer, comp=cfg.comp)
        timings["new_transfer_s"] = time.monotonic() - t
        transfers["new_transfer"] = dict(student.manifest.metrics)
        result["artifacts"]["student"] = str(student.path)
        serving["new_transfer"] = _serving_metrics(student)
    if not cfg.evaluate:  # prepare only: the artifacts for a later run's replay
        return _finish(result | {"transfers": transfers, "results": {}}, out, timings, started, cfg)
    t = time.monotonic()
    old_keys = old.encode([e.text for e in hist])
    timings["old_memory_keys_s"] = time.monotonic() - t
    old_memory = _memory(old, hist, old_keys)
    systems = [
        _System(
            "old",
            old,
            [teacher],
            [
                _Variant("memory", old_memory),
                _Variant("memory@defaults", old_memory, [uncalibrated(teacher)]),
                _Variant("no_memory", None),
            ],
            cfg.comp,
        )
    ]
    if cfg.new_model:
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
                    _Variant("rekeyed_memory@defaults", rekeyed, [uncalibrated(student)]),
                    _Variant("empty_memory", InProcessMemory(new.dim)),
                    _Variant("no_memory", None),
                ],
                cfg.comp,
            )
        )
        if cfg.retrain_reference:
            t = time.monotonic()
            scratch = _teacher(new, domain, train, cfg.teacher, work / "artifacts-retrain")
            scratch = _fitted(new, cfg.comp, scratch, train, hold)
            timings["new_retrain_s"] = time.monotonic() - t
            serving["new_retrain"] = _serving_metrics(scratch)
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
        direct = _fitted(same, cfg.comp, republish(work / "artifacts-same", teacher, same), train, hold)
        t = time.monotonic()
        res = transfer_adapter(old, teacher, same, buffered, cfg.transfer)
        distilled = publish_transfer(work / "artifacts-same", teacher, res, same, cfg.transfer, comp=cfg.comp)
        timings["same_arch_transfer_s"] = time.monotonic() - t
        transfers["same_arch_transfer"] = dict(distilled.manifest.metrics)
        serving["same_arch_direct"] = _serving_metrics(direct)
        serving["same_arch_transfer"] = _serving_metrics(distilled)
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
    for system in systems:
        system.online_mix = cfg.online_mix
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
            row = table[f"{system.name}/{v.name}"] = {
                "accuracy": float(np.mean(v.correct)),
                "windows": _windows(v.correct, cfg.window),
            }
            if v.memory is not None:
                row["mix_weight"] = _mix_weights(v.memory, v.adapters or system.adapters)
        timings[f"replay_{system.name}_s"] = system.seconds
    return _finish(result | {"transfers": transfers, "results": table}, out, timings, started, cfg)


def _outcome(p: Prediction, label: str) -> Outcome | None:
    served = ServedMix.from_json(p.mix) if p.mix is not None else None
    return served.outcome(label) if served is not None else None


def _mix_weights(memory: InProcessMemory, adapters: list[Artifact]) -> dict[str, list[float]]:
    """Per adapter version: [fitted weight, weight learned online at the end, labelled answers used,
    compensation scale learned for mere neighbours, answers it learned from]."""
    out = {}
    for a in adapters:
        prior = memory_weight(a)
        learned, n = memory.mixing.weight(a.manifest.domain, a.manifest.version, prior)
        scale, n_comp = memory.mixing.comp_scale(a.manifest.domain, a.manifest.version)
        out[a.manifest.version] = [prior, learned, float(n), scale, float(n_comp)]
    return out


def _finish(result: dict[str, Any], out: Path, timings: dict[str, float], started: float, cfg) -> dict:
    result |= {"timings": timings, "seconds": time.monotonic() - started, "device": cfg.device}
    (out / "transfer.json").write_text(json.dumps(result, indent=2))
    (out / "transfer.md").write_text(markdown(result))
    return result


def memory_gains(rows: dict[str, Any]) -> dict[str, list[float]]:
    """Per window, each memory variant's accuracy minus its system's ``no_memory`` one."""
    out = {}
    for name, r in rows.items():
        system, variant = name.split("/", 1)
        base = rows.get(f"{system}/no_memory")
        if base is None or variant in ("no_memory", "empty_memory"):
            continue
        out[name] = [a - b for a, b in zip(r["windows"], base["windows"], strict=True)]
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = result["results"]
    n_windows = max((len(r["windows"]) for r in rows.values()), default=0)
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
    gains = memory_gains(rows)
    if gains:
        lines += ["", "Memory gain per window (points, memory minus no memory on the same system):", ""]
        for name, g in gains.items():
            lines.append(f"- {name}: " + ", ".join(f"{100 * x:+.1f}" for x in g))
    mixes = {n: r["mix_weight"] for n, r in rows.items() if r.get("mix_weight")}
    if mixes:
        lines += [
            "",
            "Learned online by the end: memory weight beside the head, fitted -> learned (answers); "
            "compensation scale for mere neighbours (answers):",
            "",
        ]
        for name, per in mixes.items():
            lines.append(
                f"- {name}: "
                + ", ".join(
                    f"{v} {r[0]:.2f} -> {r[1]:.2f} ({r[2]:.0f}); scale {r[3]:.2f} ({r[4]:.0f})"
                    for v, r in per.items()
                )
            )
    lines += ["", "Serving calibration (fitted on the buffer's holdout, as the learner does):", ""]
    for name, cal in result.get("serving_calibration", {}).items():
        lines.append(f"- {name}: " + (", ".join(f"{k} {v:.2f}" for k, v in cal.items()) or "defaults"))
    lines += ["", "Transfers (held-out newest buffered examples):", ""]
    for name, rep in result["transfers"].items():
        keys = ("teacher_accuracy", "holdout_accuracy", "agreement", "nfr", "pfr", "transfer_synthetic_kept")
        lines.append(f"- {name}: " + ", ".join(f"{k} {rep[k]:.3f}" for k in keys if k in rep))
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()), ""]
    return "\n".join(lines)
