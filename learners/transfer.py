"""Moving a domain's adapter + head to another base model without the tenant's raw data (Trans-LoRA).

Adapters do not load across base models with another architecture or tokenizer, and even a
same-architecture update (new weights) shifts the features a head was fitted to. The transfer distils
the *teacher* (old base + adapter + head) into a *student* (new base + new LoRA + head):

1. Inputs: only what the replay buffer may keep. Its labelled examples are split by time; the newest
   ``holdout_frac`` measure the result and the rest, plus synthetic texts perturbed from them (word
   dropout, adjacent swaps, span-mixes of two buffered texts), are the training inputs.
2. Discriminator: a synthetic text is kept only if its old-base embedding is as close to the domain key
   (the mean old-base embedding of the buffered texts) as the ``key_quantile`` of the real texts are, and
   the teacher is at least ``min_confidence`` sure of it: perturbations that left the domain, or that the
   teacher cannot label, are dropped.
3. Student: KL(teacher_T || student_T)·T² on every input, plus ``ce_weight``·CE on the buffered labels.
   When the new base has the old one's architecture the student starts from the teacher's LoRA and head
   (a weight update of the same model); otherwise from a fresh LoRA and class-mean head, as a first
   training does.

The published artifact carries the new base's fingerprint and ``parent`` = the teacher's version, so
lineage crosses the base change; its metrics compare teacher and student on the held-out examples.

4. Serving calibration: the student's ``memory_weight`` and ``compensation_sim_low`` are fitted on the
   same held-out examples, against a memory of the training part keyed by the *new* base, exactly as the
   learner fits a candidate (``learners.evaluation``). Both depend on the base's geometry (MPNet's
   similarities are not MiniLM's), so a transferred adapter must not inherit the teacher's or the
   defaults.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModel

from learners import artifacts
from learners.buffer import Example
from learners.evaluation import fit_compensation_floor, fit_memory_weight, memory_of, with_memory_weight
from learners.trainer import (
    TrainConfig,
    TrainedAdapter,
    adapter_layers,
    lora_config,
    lora_layer_count,
    make_optimizer,
    optimizer_step,
)
from serving.artifacts import ADAPTER_DIR, HEAD_FILE, Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.predictor import DEFAULT_MEMORY_WEIGHT, Predictor
from streams.schemas import ArtifactManifest


@dataclass(frozen=True)
class TransferConfig:
    synthetic_per_example: int = 3
    drop_prob: float = 0.15
    swap_prob: float = 0.1
    mix_share: float = 0.3  # share of synthetic texts that splice spans of two buffered texts
    key_quantile: float = 0.05
    min_confidence: float = 0.0
    temperature: float = 2.0
    ce_weight: float = 0.5
    holdout_frac: float = 0.2
    max_examples: int = 2000  # the newest buffered examples used (bounds the cost of a migration)
    # LoRA in every layer of a new architecture (what docs/migration.md measured); a student of the same
    # architecture takes its teacher's layers.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, max_steps=300, batch_size=16, lora_layers=None)
    )
    seed: int = 0


@dataclass
class TransferResult:
    trained: TrainedAdapter
    report: dict[str, float]
    n_train: int
    n_holdout: int
    train: list[Example] = field(default_factory=list)  # the buffered split, for the serving calibration
    hold: list[Example] = field(default_factory=list)


# -- synthetic inputs -----------------------------------------------------------------------------------
def perturb(texts: Sequence[str], cfg: TransferConfig, rng: random.Random) -> list[str]:
    """``synthetic_per_example`` perturbed variants per text (word level, so any tokenizer reads them)."""
    words = [t.split() for t in texts]
    out: list[str] = []
    for i, w in enumerate(words):
        for _ in range(cfg.synthetic_per_example):
            if len(words) > 1 and rng.random() < cfg.mix_share:
                other = words[rng.randrange(len(words))]
                out.append(" ".join(_span_mix(w, other, rng)))
                continue
            variant = [tok for tok in w if rng.random() >= cfg.drop_prob] or list(w[:1])
            for j in range(len(variant) - 1):
                if rng.random() < cfg.swap_prob:
                    variant[j], variant[j + 1] = variant[j + 1], variant[j]
            out.append(" ".join(variant) if variant else texts[i])
    return [t for t in out if t.strip()]


def _span_mix(a: list[str], b: list[str], rng: random.Random) -> list[str]:
    """A contiguous 30-70% span of ``a`` followed by one of ``b``."""

    def span(w: list[str]) -> list[str]:
        if len(w) < 2:
            return list(w)
        n = max(1, int(len(w) * rng.uniform(0.3, 0.7)))
        start = rng.randrange(0, len(w) - n + 1)
        return w[start : start + n]

    return span(a) + span(b)


# -- teacher --------------------------------------------------------------------------------------------
def teacher_outputs(
    encoder: Encoder, artifact: Artifact, texts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(base embeddings, head probabilities) of the teacher for ``texts``."""
    name = f"transfer-teacher@{artifact.manifest.version}"
    encoder.add_adapter(name, artifact.adapter_dir)
    try:
        base = encoder.encode(list(texts))
        with encoder.lock:
            adapted = encoder.encode(list(texts), adapter=name)
    finally:
        encoder.remove_adapter(name)
    return base, artifact.head.probs(adapted)


def discriminate(
    real_base: np.ndarray, synth_base: np.ndarray, synth_probs: np.ndarray, cfg: TransferConfig
) -> np.ndarray:
    """Mask of synthetic inputs that stay in the domain (key similarity) and that the teacher can label."""
    key = real_base.mean(axis=0)
    key /= max(float(np.linalg.norm(key)), 1e-12)
    threshold = float(np.quantile(real_base @ key, cfg.key_quantile))
    return (synth_base @ key >= threshold) & (synth_probs.max(axis=1) >= cfg.min_confidence)


# -- student --------------------------------------------------------------------------------------------
def _same_architecture(student: torch.nn.Module, teacher_state: dict[str, torch.Tensor]) -> bool:
    own = get_peft_model_state_dict(student)
    return set(own) == set(teacher_state) and all(own[k].shape == teacher_state[k].shape for k in own)


def distil(
    encoder: Encoder,
    texts: Sequence[str],
    soft: np.ndarray,
    hard: np.ndarray,
    labels: list[str],
    cfg: TransferConfig,
    teacher: Artifact | None = None,
    init_count: int | None = None,
) -> TrainedAdapter:
    """Train a LoRA + head on ``encoder``'s base to match ``soft`` (N, C); ``hard[i] >= 0`` adds CE."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    teacher_state = load_file(str(teacher.adapter_dir / "adapter_model.safetensors")) if teacher else {}
    model, warm = None, False
    if teacher is not None and teacher.head.weight.shape[1] == encoder.dim:
        # Same architecture: the student takes the teacher's layers and starts from its weights.
        fresh = AutoModel.from_pretrained(encoder.model_path, dtype=torch.float32).to(encoder.device)
        n = lora_layer_count(fresh)
        layers = adapter_layers(teacher.adapter_dir) or range(n)
        if max(layers) < n:
            model = get_peft_model(fresh, lora_config(fresh, tc, layers))
            warm = _same_architecture(model, teacher_state)
    if not warm:
        fresh = AutoModel.from_pretrained(encoder.model_path, dtype=torch.float32).to(encoder.device)
        model = get_peft_model(fresh, lora_config(fresh, tc))
    assert model is not None
    if warm and teacher is not None:
        set_peft_model_state_dict(model, teacher_state)
        weight = torch.from_numpy(teacher.head.weight.copy())
        bias = torch.from_numpy(teacher.head.bias.copy())
    else:
        # Class means of the new base's embeddings under the teacher's labels, as a first training does;
        # the first ``init_count`` inputs (the real ones) suffice and keep a slow new base's cost down.
        n_init = len(texts) if init_count is None else init_count
        base = torch.from_numpy(encoder.encode(list(texts[:n_init])))
        assign = torch.from_numpy(soft[:n_init]).float()
        means = assign.T @ base / assign.sum(0, keepdim=True).T.clamp(min=1e-6)
        weight = torch.nn.functional.normalize(means, dim=1) * tc.init_scale
        bias = torch.zeros(len(labels))
    head_w = torch.nn.Parameter(weight.float().to(encoder.device))
    head_b = torch.nn.Parameter(bias.float().to(encoder.device))
    soft_t = torch.from_numpy(soft).float().to(encoder.device)
    hard_t = torch.from_numpy(hard).long().to(encoder.device)
    opt, base_lrs = make_optimizer(model, [head_w, head_b], tc)
    n = len(texts)
    total = min(tc.max_steps, tc.epochs * math.ceil(n / tc.batch_size))
    warmup = max(1, int(total * tc.warmup_frac))
    temp = cfg.temperature
    use_bf16 = encoder.device.type == "cuda"
    model.train()
    order, step, last = list(range(n)), 0, float("nan")
    while step < total:
        rng.shuffle(order)
        for start in range(0, n, tc.batch_size):
            if step >= total:
                break
            idx = order[start : start + tc.batch_size]
            batch = encoder.tokenize([texts[i] for i in idx])
            with torch.autocast(device_type=encoder.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**batch)
            logits = encoder.pool(out.last_hidden_state, batch["attention_mask"]) @ head_w.T + head_b
            target = torch.softmax(torch.log(soft_t[idx].clamp(min=1e-8)) / temp, dim=1)
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(logits / temp, dim=1), target, reduction="batchmean"
            ) * (temp * temp)
            labelled = hard_t[idx] >= 0
            if cfg.ce_weight > 0 and bool(labelled.any()):
                loss = loss + cfg.ce_weight * torch.nn.functional.cross_entropy(
                    logits[labelled], hard_t[idx][labelled]
                )
            optimizer_step(opt, base_lrs, loss, step, total, warmup)
            last = loss.detach()  # read once at the end: a per-step .item() stalls the GPU queue
            step += 1
    model.eval()
    return TrainedAdapter(list(labels), model, head_w.data, head_b.data, step, float(last))


def _student_probs(encoder: Encoder, trained: TrainedAdapter, texts: Sequence[str]) -> np.ndarray:
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), encoder.batch_size):
            batch = encoder.tokenize(texts[start : start + encoder.batch_size])
            out = trained.model(**batch)
            chunks.append(encoder.pool(out.last_hidden_state, batch["attention_mask"]).float().cpu().numpy())
    emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return trained.head().probs(emb)


# -- one domain -----------------------------------------------------------------------------------------
def transfer_adapter(
    teacher_encoder: Encoder,
    teacher: Artifact,
    student_encoder: Encoder,
    examples: Sequence[Example],
    cfg: TransferConfig,
) -> TransferResult:
    """Distil ``teacher`` into an adapter on ``student_encoder``'s base from buffered ``examples`` only."""
    if not examples:
        raise ValueError(
            f"domain {teacher.manifest.domain}: the replay buffer holds no examples to transfer with"
        )
    started = time.monotonic()
    rows = sorted(examples, key=lambda e: e.ts)[-cfg.max_examples :]
    n_hold = int(len(rows) * cfg.holdout_frac) if len(rows) >= 10 else 0
    train, hold = (rows[:-n_hold], rows[-n_hold:]) if n_hold else (rows, [])
    labels = list(teacher.head.labels)
    index = {lab: i for i, lab in enumerate(labels)}
    real = [e.text for e in train]
    synth = perturb(real, cfg, random.Random(cfg.seed))
    real_base, real_probs = teacher_outputs(teacher_encoder, teacher, real)
    synth_base, synth_probs = teacher_outputs(teacher_encoder, teacher, synth)
    keep = discriminate(real_base, synth_base, synth_probs, cfg) if len(synth) else np.zeros(0, bool)
    texts = real + [t for t, k in zip(synth, keep, strict=True) if k]
    soft = np.concatenate([real_probs, synth_probs[keep]]).astype(np.float32)
    # A buffered label the teacher's head never saw carries no CE term (the head has no row for it).
    hard = np.array([index.get(e.label, -1) for e in train] + [-1] * int(keep.sum()), dtype=np.int64)
    trained = distil(student_encoder, texts, soft, hard, labels, cfg, teacher=teacher, init_count=len(real))
    report = {
        "transfer_real": float(len(real)),
        "transfer_synthetic": float(len(synth)),
        "transfer_synthetic_kept": float(keep.sum()),
        "train_steps": float(trained.steps),
        "train_loss": trained.final_loss,
    }
    if hold:
        hold_texts, truth = [e.text for e in hold], [e.label for e in hold]
        t_pred = teacher_outputs(teacher_encoder, teacher, hold_texts)[1].argmax(1)
        s_pred = _student_probs(student_encoder, trained, hold_texts).argmax(1)
        t_ok = np.array([labels[i] == y for i, y in zip(t_pred, truth, strict=True)])
        s_ok = np.array([labels[i] == y for i, y in zip(s_pred, truth, strict=True)])
        report |= {
            "holdout_size": float(len(hold)),
            "teacher_accuracy": float(t_ok.mean()),
            "holdout_accuracy": float(s_ok.mean()),
            "agreement": float((t_pred == s_pred).mean()),
            "nfr": float((t_ok & ~s_ok).mean()),
            "pfr": float((~t_ok & s_ok).mean()),
        }
    report["train_seconds"] = time.monotonic() - started
    return TransferResult(trained, report, len(train), len(hold), list(train), list(hold))


# -- serving calibration --------------------------------------------------------------------------------
CALIBRATION = ("memory_weight", "compensation_sim_low")
MCNEMAR_CHI2 = 3.84  # chi-square, 1 degree of freedom, 5%: the fitted calibration must beat the defaults


def fit_serving(
    encoder: Encoder,
    comp: CompensationConfig,
    artifact: Artifact,
    train: Sequence[Example],
    hold: Sequence[Example],
) -> dict[str, float]:
    """``memory_weight`` and ``compensation_sim_low`` for ``artifact`` on ``encoder``'s base, fitted on
    ``hold`` against a memory of ``train`` keyed by that base (weight on the whole holdout, floor at that
    weight, as the learner's evaluation fits a candidate). Empty without held-out data.

    A few hundred held-out examples and a memory of only the buffer's training part are weak evidence
    against the deployment's defaults: in the MiniLM -> MPNet bench the fit (weight 0.1, floor 0.8) cost
    6 points on the replayed stream against the defaults, whose memory held the whole history. So the
    fitted values are kept only when they beat the defaults on the holdout by McNemar's test (continuity
    corrected); otherwise the defaults are written explicitly. ``calibration_wins`` / ``_losses`` count
    the held-out examples the fitted values got right and the defaults wrong, and the reverse."""
    if not hold:
        return {}
    domain = artifact.manifest.domain
    predictor = Predictor(encoder, memory_of(encoder, domain, train), comp)
    texts, truth = [e.text for e in hold], [e.label for e in hold]
    weight = fit_memory_weight(predictor, artifact, domain, texts, truth)
    fitted = {"memory_weight": weight}
    floor = fit_compensation_floor(predictor, with_memory_weight(artifact, weight), domain, texts, truth)
    if floor is not None:
        fitted["compensation_sim_low"] = floor
    defaults = {"memory_weight": DEFAULT_MEMORY_WEIGHT}
    right = {}
    for name, values in (("fitted", fitted), ("defaults", defaults)):
        predictor.activate(calibrated(artifact, values, suffix=name))
        preds = predictor.predict(texts, [domain] * len(texts))
        right[name] = np.array([p.label == t for p, t in zip(preds, truth, strict=True)])
    predictor.deactivate(domain)
    wins = int((right["fitted"] & ~right["defaults"]).sum())
    losses = int((~right["fitted"] & right["defaults"]).sum())
    out = fitted if mcnemar_better(wins, losses) else defaults
    return out | {"calibration_wins": float(wins), "calibration_losses": float(losses)}


def mcnemar_better(wins: int, losses: int, chi2: float = MCNEMAR_CHI2) -> bool:
    """Whether ``wins`` discordant pairs against ``losses`` are more than chance (continuity corrected)."""
    return wins > losses and (abs(wins - losses) - 1) ** 2 / (wins + losses) >= chi2


def calibrated(artifact: Artifact, values: dict[str, float], suffix: str) -> Artifact:
    """``artifact`` with exactly these serving calibration values (others dropped), under another version
    string so a Predictor swaps to it (same weights: nothing is reloaded)."""
    m = artifact.manifest
    metrics = {k: v for k, v in m.metrics.items() if k not in CALIBRATION} | values
    manifest = m.model_copy(update={"metrics": metrics, "version": f"{m.version}-{suffix}"})
    return dataclasses.replace(artifact, manifest=manifest)


def publish_transfer(
    artifacts_root: str | Path,
    teacher: Artifact,
    result: TransferResult,
    student_encoder: Encoder,
    cfg: TransferConfig,
    comp: CompensationConfig | None = None,
) -> Artifact:
    """Stage, verify with serving's loader against the new base, then commit atomically.

    With ``comp`` (the deployment's compensation) the student's serving calibration (``fit_serving``) is
    fitted on the staged artifact and committed with its metrics, so it serves as it was evaluated."""
    m = teacher.manifest
    manifest = ArtifactManifest(
        domain=m.domain,
        version=artifacts.new_version(),
        parent=m.version,
        base_fingerprint=student_encoder.fingerprint,
        labels=result.trained.labels,
        files={},
        lora=result.trained.lora_manifest(),
        data_window={
            "transfer_from": m.base_fingerprint,
            "n_train": result.n_train,
            "n_holdout": result.n_holdout,
        },
    )
    staged = artifacts.stage(artifacts_root, manifest, result.trained.write)
    try:
        loaded = load_artifact(staged, base_fingerprint=student_encoder.fingerprint, dim=student_encoder.dim)
        metrics = dict(result.report)
        if comp is not None:
            metrics |= fit_serving(student_encoder, comp, loaded, result.train, result.hold)
        final = artifacts.commit(staged, metrics=metrics)
    except BaseException:
        artifacts.discard(staged)
        raise
    return load_artifact(final, base_fingerprint=student_encoder.fingerprint, dim=student_encoder.dim)


def republish(artifacts_root: str | Path, teacher: Artifact, encoder: Encoder) -> Artifact:
    """The teacher's LoRA and head unchanged, re-published for a same-architecture base (no training).

    The base-fingerprint check exists because features move when base weights change; this is the
    explicit, measured decision to carry an adapter over anyway (``transfer_adapter`` is the alternative).
    """
    if teacher.head.weight.shape[1] != encoder.dim:
        raise ValueError(
            f"head width {teacher.head.weight.shape[1]} differs from the new base's {encoder.dim}"
        )
    probe = get_peft_model(
        AutoModel.from_pretrained(encoder.model_path),
        LoraConfig(**_lora_kwargs(teacher)),
    )
    state = load_file(str(teacher.adapter_dir / "adapter_model.safetensors"))
    if not _same_architecture(probe, state):
        raise ValueError("the adapter's weights do not fit the new base; use transfer_adapter")
    m = teacher.manifest
    manifest = m.model_copy(
        update={
            "version": artifacts.new_version(),
            "parent": m.version,
            "base_fingerprint": encoder.fingerprint,
            "files": {},
            "metrics": {},
            "data_window": {**m.data_window, "republished_from": m.base_fingerprint},
        }
    )

    def write(directory: Path) -> None:
        import shutil

        shutil.copytree(teacher.adapter_dir, directory / ADAPTER_DIR)
        shutil.copy2(teacher.path / HEAD_FILE, directory / HEAD_FILE)

    path = artifacts.publish(artifacts_root, manifest, write)
    return load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim)


def _lora_kwargs(artifact: Artifact) -> dict:
    import json

    cfg = json.loads((artifact.adapter_dir / "adapter_config.json").read_text())
    return {
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "target_modules": list(cfg["target_modules"]),
        "layers_to_transform": cfg.get("layers_to_transform"),
    }
