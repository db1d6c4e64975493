"""``driftserve bench nfr``: one model update made two ways on the same data, and the flips each causes.

Protocol (one domain of a labelled stream, in ts order, all in-process, ``learners.trainer`` for every
model, the same seed and the same number of optimizer steps for both updates):

1. ``v1``: an adapter + head trained from the base on window 1 (``v1_events`` events), as the learner
   trains a first adapter (the newest ``holdout_frac`` held out to fit its memory weight).
2. The update, on window 2 (the next ``update_events`` events), from ``v1``:

   * ``naive``: plain fine-tuning, continued from v1 on window 2 only: no replay, no distillation, no
     BCT term (``distill_weight = bct_weight = 0``);
   * ``driftserve``: what the learner does: the replay buffer's snapshot (old examples beside the new
     ones), re-warmed and re-decayed learning rate, MUSCLE distillation and the BCT influence term, the
     interpolation toward v1 and the guard (``serving.guard``: the update keeps v1's answer unless it is
     sure of its own, margin fitted on the holdout) — the learner's ``TrainConfig`` compatibility settings.

3. Every model answers a held-out later slice (``eval_events`` events after a ``gap``) twice: its head
   alone, and through serving's own ``Predictor`` (the error memory holding windows 1 and 2, the
   scorer's experts, compensation, and the memory weight fitted as the learner fits it).

Reported per update and mode: accuracy, gain over v1, NFR and PFR against v1 in the same mode (with the
flip counts and 95% Wilson intervals), and the issue's ratios: NFR reduction vs naive (target >= 40%),
share of naive's gain kept (target >= 95%), NFR <= 1% absolute, each ratio with a 95% paired bootstrap
interval over the evaluated events (the evaluation slice's sampling noise; training noise is not in it).
In head mode a guarded update is its head gated by v1's head at the fitted margin.

4. The gate frontier (head alone): each unguarded update's probabilities averaged with v1's at weight
   ``w``, then guarded by v1's answer at margin ``m`` (``serving.guard``), over a grid of both, scored on
   the evaluated events themselves. Tuned on the very events it is scored on, it bounds from above what
   any gate of this family, fitted on a holdout, could reach: the report gives the lowest NFR that keeps
   >= 95% of naive's gain and the most gain kept at NFR <= 1%.
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
from learners.evaluation import (
    fit_compensation_floor,
    fit_guard_margin,
    fit_memory_weight,
    flip_rates,
    memory_of,
    with_memory_weight,
    with_metrics,
)
from learners.interpolation import Interpolator, choose_alpha_on
from learners.trainer import TrainConfig, replay_mix, train_adapter
from ops.bench.transfer import _BatchMemo
from ops.replay.stream import StreamEvent, read_stream
from serving.artifacts import Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.guard import GUARD_MARGIN, guard_margin, keeps_parent
from serving.memory import InProcessMemory
from serving.predictor import Predictor, adapter_name
from streams.schemas import DEFAULT_DOMAIN, FeedbackEvent

TARGET_NFR = 0.01
TARGET_REDUCTION = 0.40
TARGET_GAIN_KEPT = 0.95
BOOTSTRAP = 2000  # paired resamples of the evaluated events for the ratios' intervals
FRONTIER_WEIGHTS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the update's share beside v1's probabilities
FRONTIER_MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)  # guard margins (0: ties keep v1's answer)


@dataclass(frozen=True)
class NfrBench:
    start: int = 0  # events skipped before window 1
    v1_events: int = 500
    update_events: int = 500
    gap: int = 0  # events skipped between window 2 and the evaluated slice
    eval_events: int = 1000
    holdout_frac: float = 0.2  # as the learner: the newest share of a snapshot fits the memory weight
    buffer_capacity: int = 20_000  # the learner's replay buffer (reservoir + recent window)
    batch: int = 64
    device: str = "cpu"
    max_length: int = 128
    model_path: str | None = None
    reuse: str | None = (
        None  # an earlier run's nfr.json: its v1 and naive artifacts are loaded, not retrained
    )
    curve: bool = True  # the interpolation curve on the evaluated slice (one head pass per grid point)
    # Both updates run exactly ``update.max_steps`` steps (epochs set high enough), so they cost the same.
    v1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, max_steps=150))
    update: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, max_steps=150))
    comp: CompensationConfig = field(default_factory=CompensationConfig)


def _domain(e: StreamEvent) -> str:
    return e.domain or DEFAULT_DOMAIN


def _split(examples: list[Example], frac: float) -> tuple[list[Example], list[Example]]:
    ordered = sorted(examples, key=lambda e: e.ts)
    n_hold = int(len(ordered) * frac)
    return (ordered[:-n_hold], ordered[-n_hold:]) if n_hold else (ordered, [])


def _publish(
    enc: Encoder,
    root: Path,
    domain: str,
    trained,
    cfg: TrainConfig,
    parent: str | None,
    guard: Artifact | None = None,
) -> Artifact:
    return artifacts.publish_trained(root, enc, domain, trained, parent, guard=guard)


def _answers(
    enc: Encoder,
    memory: InProcessMemory,
    comp: CompensationConfig,
    models: dict[str, Artifact],
    test,
    batch: int,
    probs: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per model: ``head`` (head alone) and ``served`` (serving's Predictor) correctness on ``test``;
    ``probs`` (when given) receives each model's unguarded head probabilities, batch by batch, in its
    head's label order."""
    predictor = Predictor(enc, memory, comp)
    bare = Predictor(enc, memory, comp)  # no adapter: the memory's scorer alone
    memo = _BatchMemo(enc)
    out: dict[str, dict[str, list[bool]]] = {name: {"head": [], "served": []} for name in models}
    out["memory_only"] = {"served": []}
    try:
        for start in range(0, len(test), batch):
            rows = test[start : start + batch]
            texts, truth = [e.text for e in rows], [e.label for e in rows]
            domains = [_domain(e) for e in rows]
            preds = bare.predict(texts, domains)
            out["memory_only"]["served"] += [p.label == t for p, t in zip(preds, truth, strict=True)]
            for name, artifact in models.items():
                predictor.activate(artifact)
                head = artifact.head.probs(memo(texts, adapter_name(artifact)))
                labels = _head_labels(artifact, memo, texts, head)
                out[name]["head"] += [p == t for p, t in zip(labels, truth, strict=True)]
                if probs is not None:
                    probs.setdefault(name, []).append(head)
                preds = predictor.predict(texts, domains)
                out[name]["served"] += [p.label == t for p, t in zip(preds, truth, strict=True)]
            memo.clear()
    finally:
        enc.encode = memo._encode  # type: ignore[method-assign]
    return {name: {m: np.array(v, dtype=bool) for m, v in modes.items()} for name, modes in out.items()}


def _head_labels(artifact: Artifact, memo, texts: list[str], head: np.ndarray) -> list[str]:
    """The head alone (``head``: its probabilities on ``texts``); a guarded artifact's head gated by its
    guard's head at its margin."""
    labels = [artifact.head.labels[j] for j in head.argmax(1)]
    margin = guard_margin(artifact)
    if margin is None or artifact.guard is None:
        return labels
    g = artifact.guard.head
    old = [g.labels[j] for j in g.probs(memo(texts, adapter_name(artifact.guard))).argmax(1)]
    vocab = artifact.head.labels
    return [
        o if keeps_parent(dict(zip(vocab, row, strict=True)), n, o, margin) else n
        for row, n, o in zip(head.tolist(), labels, old, strict=True)
    ]


def _fitted(
    enc: Encoder,
    comp,
    artifact: Artifact,
    train: list[Example],
    hold: list[Example],
    guard_margin: float | None = None,
) -> Artifact:
    """The artifact with the memory weight, compensation floor and (guarded) margin the learner would fit
    (memory of its training window)."""
    if not hold:
        return artifact
    domain = artifact.manifest.domain
    predictor = Predictor(enc, memory_of(enc, domain, train), comp)
    texts, truth = [e.text for e in hold], [e.label for e in hold]
    artifact = with_memory_weight(artifact, fit_memory_weight(predictor, artifact, domain, texts, truth))
    floor = fit_compensation_floor(predictor, artifact, domain, texts, truth)
    if floor is not None:
        artifact = with_metrics(artifact, compensation_sim_low=floor)
    if artifact.guard is None:
        return artifact
    margin = guard_margin
    if margin is None:
        margin = fit_guard_margin(predictor, artifact, domain, texts, truth)
    return artifact if margin is None else with_metrics(artifact, **{GUARD_MARGIN: margin})


def _curve(enc: Encoder, trained, v1: Artifact, test, grid) -> dict[float, dict[str, float]]:
    """Head-alone accuracy and flips vs v1 on ``test`` at each alpha of ``grid`` (and 0 = v1)."""
    interp = Interpolator(trained, v1)
    texts = [e.text for e in test]
    index = {lab: i for i, lab in enumerate(trained.labels)}
    truth = np.array([index.get(e.label, -1) for e in test])
    interp.set(0.0)
    old = interp.predict(enc, texts) == truth
    out = {}
    for alpha in sorted(grid):
        interp.set(alpha)
        new = interp.predict(enc, texts) == truth
        nfr, pfr = flip_rates(old, new)
        out[alpha] = {"accuracy": float(new.mean()), "nfr": nfr, "pfr": pfr}
    interp.set(1.0)
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _ratios(v1: np.ndarray, naive: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(NFR reduction vs naive, share of naive's gain kept); nan where undefined."""
    nf_naive = np.mean(v1 & ~naive)
    gain_naive = naive.mean() - v1.mean()
    reduction = 1.0 - np.mean(v1 & ~ours) / nf_naive if nf_naive > 0 else np.nan
    kept = (ours.mean() - v1.mean()) / gain_naive if gain_naive > 0 else np.nan
    return float(reduction), float(kept)


def bootstrap(
    v1: np.ndarray, naive: np.ndarray, ours: np.ndarray, n: int = BOOTSTRAP, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% paired bootstrap intervals (events resampled) of the ratios and of driftserve's NFR and gain."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        i = rng.integers(0, len(v1), len(v1))
        a, b, c = v1[i], naive[i], ours[i]
        draws.append((*_ratios(a, b, c), np.mean(a & ~c), c.mean() - a.mean(), b.mean() - a.mean()))
    arr = np.array(draws)
    out = {}
    for j, name in enumerate(("nfr_reduction", "gain_kept", "nfr", "gain", "naive_gain")):
        col = arr[:, j][np.isfinite(arr[:, j])]
        out[name] = (
            (float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))) if len(col) else (np.nan,) * 2
        )
    return out


def gain_ok(gain: float, naive_gain: float) -> bool:
    """>= 95% of naive's gain kept; a naive update that gains nothing leaves nothing to keep, and then the
    update must not lose accuracy against it."""
    return gain / naive_gain >= TARGET_GAIN_KEPT if naive_gain > 0 else gain >= naive_gain


def compare(
    v1: np.ndarray, naive: np.ndarray, ours: np.ndarray, unguarded: np.ndarray | None = None
) -> dict[str, Any]:
    """Gains, flips against v1 and the issue's ratios for one evaluation mode (``unguarded``: the
    driftserve update without its guard, reported beside it)."""
    acc_v1 = float(v1.mean())
    rows: dict[str, Any] = {"v1": {"accuracy": acc_v1, "n": len(v1)}}
    updates = [("naive", naive), ("driftserve", ours)]
    if unguarded is not None:
        updates.append(("unguarded", unguarded))
    for name, new in updates:
        nfr, pfr = flip_rates(v1, new)
        nf, pf = int(np.sum(v1 & ~new)), int(np.sum(~v1 & new))
        rows[name] = {
            "accuracy": float(new.mean()),
            "gain": float(new.mean()) - acc_v1,
            "nfr": nfr,
            "pfr": pfr,
            "nf": nf,
            "pf": pf,
            "nfr_ci": wilson(nf, len(v1)),
        }
    n, d = rows["naive"], rows["driftserve"]
    reduction = 1.0 - d["nfr"] / n["nfr"] if n["nfr"] > 0 else None
    kept = d["gain"] / n["gain"] if n["gain"] > 0 else None
    rows["targets"] = {
        "nfr_reduction": reduction,
        "gain_kept": kept,
        "nfr_ok": d["nfr"] <= TARGET_NFR,
        "reduction_ok": reduction is not None and reduction >= TARGET_REDUCTION,
        "gain_ok": gain_ok(d["gain"], n["gain"]),
    }
    rows["intervals"] = bootstrap(v1, naive, ours)
    return rows


def _aligned(vocab: list[str], labels: list[str], probs: np.ndarray) -> np.ndarray:
    """``probs`` (columns in ``labels`` order) with its columns moved to ``vocab``'s order (0 elsewhere)."""
    out = np.zeros((probs.shape[0], len(vocab)))
    out[:, [vocab.index(lab) for lab in labels]] = probs
    return out


def gate_frontier(
    old: np.ndarray,
    new: np.ndarray,
    truth: np.ndarray,
    weights: tuple[float, ...] = FRONTIER_WEIGHTS,
    margins: tuple[float, ...] = FRONTIER_MARGINS,
) -> list[dict[str, float]]:
    """Accuracy, NFR and PFR against ``old``'s answers of every gate on the grid: ``w * new + (1 - w) *
    old`` (probabilities over one vocabulary), then ``old``'s label kept where the gated answer differs
    from it by at most ``m`` (``serving.guard.keeps_parent``, vectorised). ``truth``: label columns, -1
    for a label neither knows."""
    rows = np.arange(len(truth))
    old_label = old.argmax(1)
    old_right = old_label == truth
    points = []
    for w in weights:
        mixed = w * new + (1.0 - w) * old
        label = mixed.argmax(1)
        margin = mixed[rows, label] - mixed[rows, old_label]
        for m in margins:
            right = np.where((label != old_label) & (margin <= m), old_label, label) == truth
            nfr, pfr = flip_rates(old_right, right)
            points.append({"weight": w, "margin": m, "accuracy": float(right.mean()), "nfr": nfr, "pfr": pfr})
    return points


def frontier_summary(points: list[dict[str, float]], v1_acc: float, naive_gain: float) -> dict[str, Any]:
    """The lowest NFR among the points that keep >= 95% of naive's gain, the most gain kept among those
    at NFR <= 1%, and whether any point meets all three targets (None where no point qualifies)."""

    def kept(p: dict[str, float]) -> float | None:
        return (p["accuracy"] - v1_acc) / naive_gain if naive_gain > 0 else None

    def meets(p: dict[str, float], *, nfr: bool, gain: bool) -> bool:
        return (not nfr or p["nfr"] <= TARGET_NFR) and (
            not gain or gain_ok(p["accuracy"] - v1_acc, naive_gain)
        )

    def point(p: dict[str, float] | None) -> dict[str, Any] | None:
        return None if p is None else {**p, "gain_kept": kept(p)}

    keeping = [p for p in points if meets(p, nfr=False, gain=True)]
    low = [p for p in points if meets(p, nfr=True, gain=False)]
    return {
        "lowest_nfr_keeping_gain": point(min(keeping, key=lambda p: p["nfr"], default=None)),
        "most_gain_at_nfr_target": point(max(low, key=lambda p: p["accuracy"], default=None)),
        "any_meets_all": any(meets(p, nfr=True, gain=True) for p in points),
    }


def frontiers(
    models: dict[str, Artifact], probs: dict[str, list[np.ndarray]], test, head_rows: dict[str, Any]
) -> dict[str, Any]:
    """``frontier_summary`` of the gate grid over each update's head (naive's and driftserve's; ``probs``
    holds unguarded heads, so a guarded update enters without its guard)."""
    updates = ["naive", "driftserve"]
    vocab: list[str] = []
    for name in ("v1", *updates):
        vocab += [lab for lab in models[name].head.labels if lab not in vocab]
    full = {
        n: _aligned(vocab, list(models[n].head.labels), np.concatenate(probs[n])) for n in ("v1", *updates)
    }
    index = {lab: i for i, lab in enumerate(vocab)}
    truth = np.array([index.get(e.label, -1) for e in test])
    v1_acc = float((full["v1"].argmax(1) == truth).mean())
    naive_gain = head_rows["naive"]["gain"]
    return {
        n: frontier_summary(gate_frontier(full["v1"], full[n], truth), v1_acc, naive_gain) for n in updates
    }


def run(stream: Path, out: Path, cfg: NfrBench) -> dict[str, Any]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    events = read_stream(stream).events[cfg.start :]
    domains = {_domain(e) for e in events}
    if len(domains) != 1:
        raise ValueError(f"bench nfr measures one domain; the stream has {sorted(domains)}")
    (domain,) = domains
    w1 = events[: cfg.v1_events]
    w2 = events[cfg.v1_events : cfg.v1_events + cfg.update_events]
    lo = cfg.v1_events + cfg.update_events + cfg.gap
    test = events[lo : lo + cfg.eval_events]
    if not (w1 and w2 and test):
        raise ValueError("the stream is too short for these windows")

    work = Path(tempfile.mkdtemp(prefix="bench-nfr-"))
    art = out / "artifacts"
    earlier = json.loads(Path(cfg.reuse).read_text())["artifacts"] if cfg.reuse else {}
    buffers = ReplayBuffers(work / "buffers", capacity=cfg.buffer_capacity)

    def feed(rows: list[StreamEvent]) -> None:
        buffers.add(
            [
                FeedbackEvent(event_id=e.id, text=e.text, label=e.label, domain=_domain(e), ts=e.ts)
                for e in rows
            ]
        )

    enc = Encoder(cfg.model_path, device=cfg.device, max_length=cfg.max_length)
    timings: dict[str, float] = {}

    feed(w1)
    v1_train, v1_hold = _split(buffers.examples(domain), cfg.holdout_frac)
    t = time.monotonic()
    if "v1" in earlier:
        v1 = load_artifact(earlier["v1"], base_fingerprint=enc.fingerprint, dim=enc.dim)
        v1 = _fitted(enc, cfg.comp, v1, v1_train, v1_hold)  # the memory weight is not in the manifest
    else:
        trained = train_adapter(enc, [e.text for e in v1_train], [e.label for e in v1_train], cfg.v1)
        v1 = _fitted(enc, cfg.comp, _publish(enc, art, domain, trained, cfg.v1, None), v1_train, v1_hold)
        timings["v1_train_s"] = time.monotonic() - t

    feed(w2)
    snap_train, snap_hold = _split(buffers.examples(domain), cfg.holdout_frac)
    new_ids = {e.id for e in w2}
    new_train = [e for e in snap_train if e.event_id in new_ids]  # the same new examples both updates see
    parent = v1.manifest.version
    naive_cfg = replace(cfg.update, distill_weight=0.0, bct_weight=0.0, interpolation_grid=(), guard=False)
    t = time.monotonic()
    if "naive" in earlier:
        naive = load_artifact(earlier["naive"], base_fingerprint=enc.fingerprint, dim=enc.dim)
        naive = _fitted(enc, cfg.comp, naive, snap_train, snap_hold)
    else:
        trained = train_adapter(
            enc, [e.text for e in new_train], [e.label for e in new_train], naive_cfg, parent=v1
        )
        naive = _fitted(
            enc, cfg.comp, _publish(enc, art, domain, trained, naive_cfg, parent), snap_train, snap_hold
        )
        timings["naive_train_s"] = time.monotonic() - t
    t = time.monotonic()
    old_train = [e for e in snap_train if e.event_id not in new_ids]
    ours_train = replay_mix(new_train, old_train, cfg.update.replay_share, cfg.update.seed)
    trained = train_adapter(
        enc, [e.text for e in ours_train], [e.label for e in ours_train], cfg.update, parent=v1
    )
    timings["driftserve_train_s"] = time.monotonic() - t
    # The interpolation curve on the evaluated slice (head alone), for the record; the learner's choice
    # below sees only the holdout, as in service.
    t = time.monotonic()
    curve = (
        _curve(enc, trained, v1, test, cfg.update.interpolation_grid)
        if cfg.update.interpolation_grid and cfg.curve
        else {}
    )
    timings["curve_s"] = time.monotonic() - t
    alpha = choose_alpha_on(enc, trained, v1, snap_hold, cfg.update.interpolation_grid)
    guard = v1 if cfg.update.guard else None
    ours = _fitted(
        enc,
        cfg.comp,
        _publish(enc, art, domain, trained, cfg.update, parent, guard=guard),
        snap_train,
        snap_hold,
        cfg.update.guard_margin,
    )

    t = time.monotonic()
    # all feedback so far
    memory = memory_of(enc, domain, sorted(buffers.examples(domain), key=lambda e: e.ts))
    models = {"v1": v1, "naive": naive, "driftserve": ours}
    if ours.guard is not None:  # the same update served without its guard: what the guard itself does
        models["unguarded"] = replace(ours, guard=None)
    head_probs: dict[str, list[np.ndarray]] = {}
    answers = _answers(enc, memory, cfg.comp, models, test, cfg.batch, head_probs)
    timings["evaluate_s"] = time.monotonic() - t

    modes = {
        mode: compare(
            answers["v1"][mode],
            answers["naive"][mode],
            answers["driftserve"][mode],
            answers.get("unguarded", {}).get(mode),
        )
        for mode in ("head", "served")
    }
    result: dict[str, Any] = {
        "stream": str(stream),
        "domain": domain,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("v1", "update", "comp")},
        "v1_config": asdict(cfg.v1),
        "update_config": asdict(cfg.update),
        "naive_config": asdict(naive_cfg),
        "windows": {
            "v1_train": len(v1_train),
            "update_new_train": len(new_train),
            "update_snapshot_train": len(snap_train),
            "update_driftserve_train": len(ours_train),
            "replay_share": 1.0 - len(new_train) / max(1, len(ours_train)),
            "holdout": len(snap_hold),
            "evaluated": len(test),
        },
        "compensation_sim_low": {
            n: a.manifest.metrics.get("compensation_sim_low")
            for n, a in (("v1", v1), ("naive", naive), ("driftserve", ours))
        },
        "memory_weight": {
            n: a.manifest.metrics.get("memory_weight")
            for n, a in (("v1", v1), ("naive", naive), ("driftserve", ours))
        },
        "artifacts": {n: str(a.path) for n, a in (("v1", v1), ("naive", naive), ("driftserve", ours))},
        "interpolation_alpha": alpha,
        "guard_margin": ours.manifest.metrics.get(GUARD_MARGIN),
        "interpolation_curve": {str(a): r for a, r in curve.items()},
        "memory_only_accuracy": float(answers["memory_only"]["served"].mean()),
        "modes": modes,
        "gate_frontier": frontiers(models, head_probs, test, modes["head"]),
        "timings": timings,
        "seconds": time.monotonic() - started,
        "device": cfg.device,
    }
    (out / "nfr.json").write_text(json.dumps(result, indent=2))
    (out / "nfr.md").write_text(markdown(result))
    _plot(result, out / "nfr.png")
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict[str, Any]) -> str:
    w = result["windows"]
    lines = [
        f"# Negative flips of one update on {Path(result['stream']).name} (domain {result['domain']})",
        "",
        f"v1 trained on {w['v1_train']} examples; the update sees {w['update_new_train']} new examples "
        f"(driftserve: {w.get('update_driftserve_train', w['update_snapshot_train'])} with replay, "
        f"share {_pct(w['replay_share'])}); "
        f"{w['evaluated']} later events evaluated; device {result['device']}.",
        "",
        "| mode | model | accuracy | gain vs v1 | NFR (flips, 95% CI) | PFR (flips) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, rows in result["modes"].items():
        lines.append(f"| {mode} | v1 | {rows['v1']['accuracy']:.4f} | | | |")
        for name in ("naive", "driftserve", "unguarded"):
            if name not in rows:
                continue
            r = rows[name]
            ci = r.get("nfr_ci")
            ci_s = f", {_pct(ci[0])}-{_pct(ci[1])}" if ci else ""
            lines.append(
                f"| {mode} | {name} | {r['accuracy']:.4f} | {100 * r['gain']:+.2f} pt | "
                f"{_pct(r['nfr'])} ({r.get('nf', '?')}{ci_s}) | {_pct(r['pfr'])} ({r.get('pf', '?')}) |"
            )
    lines += [
        "",
        "| mode | NFR <= 1% | NFR reduction vs naive (>= 40%) | gain kept (>= 95%) |",
        "|---|---|---|---|",
    ]
    for mode, rows in result["modes"].items():
        t, iv = rows["targets"], rows.get("intervals", {})

        def span(key: str, iv=iv, t=t) -> str:
            lo_hi = iv.get(key)
            if not lo_hi or t.get(key, 0.0) is None:  # a ratio to a naive gain <= 0 has no interval
                return ""
            return f" [{_pct(lo_hi[0])}, {_pct(lo_hi[1])}]"

        lines.append(
            f"| {mode} | {_pct(rows['driftserve']['nfr'])}{span('nfr')} "
            f"{'met' if t['nfr_ok'] else 'missed'} | "
            f"{_pct(t['nfr_reduction'])}{span('nfr_reduction')} {'met' if t['reduction_ok'] else 'missed'} | "
            f"{_pct(t['gain_kept'])}{span('gain_kept')} {'met' if t['gain_ok'] else 'missed'} |"
        )
    lines.append(
        "\nBrackets: 95% paired bootstrap intervals over the evaluated events (evaluation noise only)."
    )
    if result.get("guard_margin") is not None:
        lines.append(
            f"driftserve's update is guarded by v1 (serving.guard) at margin {result['guard_margin']}; "
            "`unguarded` is the same update served without its guard."
        )
    if result.get("interpolation_curve"):
        lines += [
            "",
            f"driftserve's update ends at alpha {result['interpolation_alpha']} between v1 and its trained "
            "weights (chosen on the holdout). Head alone on the evaluated slice at each alpha:",
            "",
            "| alpha | accuracy | NFR | PFR |",
            "|---|---|---|---|",
        ]
        for a, r in result["interpolation_curve"].items():
            lines.append(f"| {a} | {r['accuracy']:.4f} | {_pct(r['nfr'])} | {_pct(r['pfr'])} |")
    if result.get("gate_frontier"):
        lines += [
            "",
            "Gate frontier (head alone): each unguarded update averaged with v1 at weight w, then guarded by "
            "v1 at margin m, tuned on the evaluated events themselves (an upper bound for such a gate):",
            "",
            "| update | lowest NFR keeping >= 95% of naive's gain | most gain kept at NFR <= 1% "
            "| all three |",
            "|---|---|---|---|",
        ]

        def gate(p: dict[str, Any] | None) -> str:
            if p is None:
                return "none"
            kept = "n/a" if p["gain_kept"] is None else _pct(p["gain_kept"])
            return f"NFR {_pct(p['nfr'])}, kept {kept} (w {p['weight']}, m {p['margin']})"

        for name, f in result["gate_frontier"].items():
            lines.append(
                f"| {name} | {gate(f['lowest_nfr_keeping_gain'])} | {gate(f['most_gain_at_nfr_target'])} | "
                f"{'reachable' if f['any_meets_all'] else 'not reachable'} |"
            )
    lines.append(f"\nThe memory's scorer alone (no adapter): {result['memory_only_accuracy']:.4f}.")
    mw = ", ".join(f"{k} {v:.1f}" for k, v in result["memory_weight"].items() if v is not None)
    lines += [
        "",
        f"Memory weights fitted on the holdout: {mw}; compensation floors: "
        + ", ".join(f"{k} {v}" for k, v in result.get("compensation_sim_low", {}).items())
        + ".",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()),
        "",
    ]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(result["modes"])
    x = np.arange(len(modes))
    for i, name in enumerate(("v1", "naive", "driftserve")):
        axes[0].bar(
            x + (i - 1) * 0.25, [result["modes"][m][name]["accuracy"] for m in modes], 0.25, label=name
        )
        if name != "v1":
            axes[1].bar(
                x + (i - 1.5) * 0.35,
                [100 * result["modes"][m][name]["nfr"] for m in modes],
                0.35,
                label=f"{name} NFR",
            )
    axes[1].axhline(100 * TARGET_NFR, color="k", ls="--", lw=1, label="1% target")
    for ax, title in zip(axes, ("accuracy on the later slice", "negative flips vs v1 (%)"), strict=True):
        ax.set_xticks(x, modes)
        ax.set_title(title)
        ax.legend(fontsize=8)
    lo = min(result["modes"][m][n]["accuracy"] for m in modes for n in ("v1", "naive", "driftserve"))
    axes[0].set_ylim(max(0.0, lo - 0.1), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
