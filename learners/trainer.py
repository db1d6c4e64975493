"""LoRA + head training for one domain on labelled feedback.

The head starts from the class means of the base embeddings (the same nearest-class-mean rule serving
uses before any adapter exists), so a few steps already match the serving baseline and training only
has to improve on it. When a parent artifact exists its LoRA weights and head rows are the starting
point (continued training), and a label the parent never saw gets a new head row.

Continued training follows the continual recipe (DESIGN.md): the learning rate is re-warmed and
re-decayed every run, and the replay buffer (a reservoir of old data beside the recent window) supplies
the replay share. Two compatibility terms keep the update from breaking what users rely on:

- MUSCLE-style distillation: on the training examples the parent gets right, KL(parent || new) at
  temperature T (times T^2), so the new model keeps those answers (fewer negative flips);
- BCT-style influence loss: the parent's head applied to the new features must still classify them
  (cross-entropy over the parent's labels), so the new representation stays usable by what was built on
  the old one.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from serving.artifacts import ADAPTER_DIR, HEAD_FILE, Artifact, Head
from serving.encoder import Encoder

T = TypeVar("T")

HEAD_INIT_SAMPLE = 4096  # examples whose base embeddings give the head's initial class means
# Frozen layers' outputs a run may keep (float16, unpadded rows); above it every step runs every layer.
FROZEN_CACHE_BYTES = 768 << 20


@dataclass(frozen=True)
class TrainConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    # LoRA in the top N transformer layers only (None: every layer). The layers below are frozen, so a
    # run computes their output for each training text once and every step runs the top N alone
    # (``FROZEN_CACHE_BYTES``). A run continued from a parent keeps the parent's layers.
    lora_layers: int | None = 3
    # Training texts are cut to this many tokens (None: the encoder's ``max_length``), keeping the
    # closing special token as the tokenizer's truncation does; serving and evaluation read the whole
    # window. With ``lora_layers`` 3 and 5 passes it trained as well as every layer at 128 tokens and
    # 3 passes, in half the time (docs/replay.md, "Faster training runs").
    max_length: int | None = 64
    epochs: int = 5
    # Passes over the training set of a run continued from a parent (None: ``epochs``). Such a run
    # starts from weights that already fit the replayed part, and each run's new data is what arrived
    # during the last one: fewer passes make runs shorter, so the next candidate comes sooner.
    continued_epochs: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    head_lr: float = 5e-3
    warmup_frac: float = 0.1
    max_steps: int = 400
    init_scale: float = 20.0
    seed: int = 0
    # MUSCLE's flip mask at weight 3: on reviews-finefood (new examples only, head alone, 4000 later
    # events) it kept 92% of a naive update's gain with 36% fewer negative flips; the mask at weight 1
    # kept 89% with 16% fewer; "old_right" at weight 1 (with replay, BCT, interpolation) kept 5%.
    distill_weight: float = 3.0
    distill_temperature: float = 2.0
    bct_weight: float = 0.5
    # Which samples the distillation holds to the parent: "old_right" (every sample the parent gets
    # right), "flips" (MUSCLE's mask: the parent right and the model being trained currently wrong, so
    # the rest learns the new data freely) or "focal" (focal distillation, Positive-Congruent Training:
    # every sample weighted ``distill_focal_base``, plus 1 where the parent is right).
    distill_mask: str = "flips"
    distill_focal_base: float = 0.2
    # Share of replayed old examples in a continued run's training set (beside all new ones; Ibrahim et
    # al. 2024 replay 5-50%); None trains on the whole replay buffer snapshot.
    replay_share: float | None = 0.5
    # Continued runs may end between the parent and the trained weights (learners.interpolation); the
    # point is chosen on the run's holdout from this grid. () keeps the trained weights: the guard below
    # targets the same unsure flips per request, and the two together were not measured.
    interpolation_grid: tuple[float, ...] = ()
    # Continued runs may ship guarded by their parent (serving.guard: a compatible prediction update that
    # keeps the parent's answer wherever the new version is not sure of its own). Off by default: one
    # extra adapter forward per request of the domain (CPU adapter throughput 26.7 -> 18.2 texts/s), and
    # in bench nfr it cut NFR on reviews (3.1% -> 1.5% served, gain kept) but cost spam-2002 3.7 points
    # served against the same update unguarded. Settings: learner_guard.
    guard: bool = False
    # The guard's margin; None fits it on the holdout (learners.evaluation.choose_guard_margin). A
    # holdout of a few hundred events holds a handful of flips, too few to pick a margin reliably (on
    # reviews-finefood it picked 0, switching the guard off); 0.1 was chosen on reviews-finefood's later
    # events (head alone) and is confirmed on the other streams by bench nfr.
    guard_margin: float | None = 0.1


@dataclass
class TrainedAdapter:
    labels: list[str]
    model: PeftModel
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    steps: int
    final_loss: float
    parent_train_accuracy: float | None = None

    def lora_manifest(self) -> dict:
        """The LoRA's shape as an artifact manifest records it."""
        cfg = self.model.peft_config["default"]
        return {
            "r": cfg.r,
            "alpha": cfg.lora_alpha,
            "target_modules": sorted(cfg.target_modules),
            "layers": cfg.layers_to_transform,
        }

    def head(self) -> Head:
        return Head(
            labels=list(self.labels),
            weight=self.head_weight.detach().float().cpu().numpy().copy(),
            bias=self.head_bias.detach().float().cpu().numpy().copy(),
        )

    def write(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True)
        save_file(
            {
                "weight": self.head_weight.detach().float().cpu().contiguous(),
                "bias": self.head_bias.detach().float().cpu().contiguous(),
            },
            str(directory / HEAD_FILE),
        )


def replay_mix(new: Sequence[T], old: Sequence[T], share: float | None, seed: int = 0) -> list[T]:
    """A continued run's training set: every new example, plus old ones sampled to make up ``share`` of
    the set (all old ones when ``share`` is None or there are too few; all of them when nothing is new)."""
    if share is None or not new:
        return [*old, *new]
    if not 0.0 <= share < 1.0:
        raise ValueError(f"replay share must be in [0, 1), got {share}")
    k = min(len(old), round(len(new) * share / (1.0 - share)))
    return [*random.Random(seed).sample(list(old), k), *new]


# LoRA targets per architecture when the configured names are absent (MPNet names its projections q/k/v/o).
_ATTENTION_TARGETS = {"bert": ("query", "value"), "mpnet": ("q", "v")}


def lora_targets(model: torch.nn.Module, wanted: Sequence[str]) -> list[str]:
    """``wanted`` if the model has such modules, else the query/value projections of its architecture."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if all(w in names for w in wanted):
        return list(wanted)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    fallback = _ATTENTION_TARGETS.get(model_type)
    if fallback is None or not all(f in names for f in fallback):
        raise ValueError(f"no LoRA target modules {list(wanted)} in a {model_type or 'unknown'} model")
    return list(fallback)


def truncated(ids: np.ndarray, length: int | None) -> np.ndarray:
    """A tokenized text cut to ``length`` tokens, its closing special token kept (the tokenizer's rule)."""
    if length is None or len(ids) <= length:
        return ids
    if length < 2:
        raise ValueError(f"max_length must be at least 2, got {length}")
    return np.concatenate([ids[: length - 1], ids[-1:]])


def lora_layer_count(model: torch.nn.Module) -> int:
    """Transformer layers of a (peft-wrapped) encoder model."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return len(inner.encoder.layer)


def lora_config(model: torch.nn.Module, cfg: TrainConfig, layers: Sequence[int] | None = None) -> LoraConfig:
    """The LoRA of a run on ``model``: ``layers`` (a parent's) if given, else ``cfg.lora_layers`` top ones."""
    if layers is None and cfg.lora_layers is not None:
        if cfg.lora_layers < 1:
            raise ValueError(f"lora_layers must be at least 1, got {cfg.lora_layers}")
        n = lora_layer_count(model)
        layers = range(max(0, n - cfg.lora_layers), n)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model, cfg.target_modules),
        layers_to_transform=sorted(layers) if layers is not None else None,
    )


def adapter_layers(adapter_dir: Path) -> list[int] | None:
    """The layers a saved adapter's LoRA covers (None: all of them)."""
    layers = json.loads((adapter_dir / "adapter_config.json").read_text()).get("layers_to_transform")
    return [layers] if isinstance(layers, int) else layers


def make_optimizer(model, head_params: list, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW over the trainable LoRA weights (``cfg.lr``) and the head (``cfg.head_lr``), with the base
    learning rates the schedule scales."""
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": lora_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}], weight_decay=0.0
    )
    return opt, [g["lr"] for g in opt.param_groups]


def optimizer_step(
    opt: torch.optim.Optimizer, base_lrs: list[float], loss: torch.Tensor, step: int, total: int, warmup: int
) -> None:
    """Backward, set this step's scheduled learning rates, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    factor = _lr_factor(step, total, warmup)
    for g, lr in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = lr * factor
    opt.step()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Re-warm linearly, then cosine re-decay (continual pre-training recipe, DESIGN.md)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainingInterrupted(Exception):
    """``should_stop`` asked a run to end (the process is shutting down): nothing was produced."""


def train_adapter(
    encoder: Encoder,
    texts: Sequence[str],
    labels: Sequence[str],
    cfg: TrainConfig,
    parent: Artifact | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedAdapter:
    """Train on (texts, labels); ``encoder`` gives tokenizer, pooling and base embeddings, unmodified.
    ``should_stop`` is asked before every step; when it answers True the run raises
    ``TrainingInterrupted`` instead of finishing (a shutdown need not wait for minutes of CPU training)."""
    if len(texts) != len(labels) or not texts:
        raise ValueError("need equally many texts and labels, at least one")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    label_list = sorted(set(labels) | set(parent.manifest.labels if parent else ()))
    y = torch.tensor([label_list.index(lab) for lab in labels])

    # Each text is tokenized once, on first use; batches are collated (pinned, copied asynchronously)
    # on a loader thread while the accelerator runs the previous step. On a GPU that thread tokenizes
    # in Rust, without the GIL: the serving word cache is Python, and holding the GIL there starves the
    # training loop's kernel launches.
    token_ids: dict[int, np.ndarray] = {}
    release_gil = encoder.device.type == "cuda"

    def tokenize(idx: Sequence[int]) -> None:
        missing = [i for i in idx if i not in token_ids]
        rows = encoder.token_ids([texts[i] for i in missing], release_gil=release_gil)
        token_ids.update((i, truncated(row, cfg.max_length)) for i, row in zip(missing, rows, strict=True))

    def batches(order: Sequence[int], size: int):
        for start in range(0, len(order), size):
            idx = list(order[start : start + size])
            tokenize(idx)
            yield idx, encoder.collate([token_ids[i] for i in idx])

    # Head initialisation: class means of base embeddings (of a sample: a mean needs no more), then the
    # parent's rows where the parent has them (so only the labels it lacks need embeddings).
    inherited = {label_list.index(lab) for lab in parent.head.labels} if parent is not None else set()
    sample = sorted(rng.sample(range(len(texts)), min(len(texts), HEAD_INIT_SAMPLE)))
    sample = [i for i in sample if int(y[i]) not in inherited]
    weight = torch.zeros(len(label_list), encoder.dim)
    if sample:
        with torch.inference_mode():
            parts = []
            for _, batch in batches(sample, max(encoder.batch_size, cfg.batch_size)):
                with encoder.lock:
                    parts.append(encoder.forward(batch, None).float().cpu())
            base = torch.cat(parts)
        y_sample = y[sample]
        for c in range(len(label_list)):
            members = base[y_sample == c]
            if len(members):
                weight[c] = torch.nn.functional.normalize(members.mean(0), dim=0) * cfg.init_scale
    bias = torch.zeros(len(label_list))
    if parent is not None:
        for row, lab in enumerate(parent.head.labels):
            c = label_list.index(lab)
            weight[c] = torch.from_numpy(parent.head.weight[row])
            bias[c] = float(parent.head.bias[row])

    fresh = AutoModel.from_pretrained(encoder.model_path, dtype=torch.float32).to(encoder.device)
    parent_layers = None
    if parent is not None:  # a continued run keeps its parent's layers (all of them if it names none)
        parent_layers = adapter_layers(parent.adapter_dir) or range(lora_layer_count(fresh))
    model = get_peft_model(fresh, lora_config(fresh, cfg, parent_layers))
    if parent is not None:
        set_peft_model_state_dict(model, load_file(str(parent.adapter_dir / "adapter_model.safetensors")))
    head_w = torch.nn.Parameter(weight.to(encoder.device))
    head_b = torch.nn.Parameter(bias.to(encoder.device))
    y = y.to(encoder.device)
    use_bf16 = encoder.device.type == "cuda"  # bf16 autocast on GPU, fp32 master weights

    # Frozen layers below the first adapted one: their outputs are computed once per text.
    # Worth it when the run reads its texts more than once: the steps, and the parent's answers.
    reads = _total_steps(cfg, len(texts), parent) * cfg.batch_size + (
        len(texts) if _distils(cfg, parent) else 0
    )
    prefix = None
    if reads > len(texts):
        prefix = _FrozenPrefix.build(model, encoder, len(texts), tokenize, token_ids, use_bf16)
    inputs = batches
    if prefix is not None:
        prefix.fill(model, batches(range(len(texts)), 64))
        inputs = prefix.batches
    with prefix.adapted_only() if prefix is not None else contextlib.nullcontext():
        trained = _train_loop(
            model, encoder, cfg, inputs, rng, y, label_list, (head_w, head_b), parent, should_stop, use_bf16
        )
    model.eval()  # the whole model again, frozen layers included
    return trained


def _total_steps(cfg: TrainConfig, n: int, parent: Artifact | None) -> int:
    epochs = cfg.continued_epochs if parent is not None and cfg.continued_epochs is not None else cfg.epochs
    return min(cfg.max_steps, epochs * math.ceil(n / cfg.batch_size))


def _distils(cfg: TrainConfig, parent: Artifact | None) -> bool:
    """Whether the run reads its parent's answers on the training data (the compatibility terms)."""
    return parent is not None and (cfg.distill_weight > 0 or cfg.bct_weight > 0)


def _train_loop(
    model: PeftModel,
    encoder: Encoder,
    cfg: TrainConfig,
    inputs: Callable,
    rng: random.Random,
    y: torch.Tensor,
    label_list: list[str],
    head: tuple[torch.nn.Parameter, torch.nn.Parameter],
    parent: Artifact | None,
    should_stop: Callable[[], bool] | None,
    use_bf16: bool,
) -> TrainedAdapter:
    """The optimisation of ``train_adapter``: ``inputs(order, size)`` yields (indices, model inputs)."""
    head_w, head_b = head
    n = len(y)

    # The parent's answers on the training data (the model equals the parent before the first step).
    old_logits = old_head = None
    old_cols = torch.zeros(0, dtype=torch.long)
    parent_acc = None
    if parent is not None and _distils(cfg, parent):
        old_cols = torch.tensor([label_list.index(lab) for lab in parent.head.labels], device=encoder.device)
        old_w = torch.from_numpy(parent.head.weight).float().to(encoder.device)
        old_b = torch.from_numpy(parent.head.bias).float().to(encoder.device)
        old_head = (old_w, old_b)
        model.eval()
        parts = []
        with torch.no_grad():
            for _, batch in inputs(range(n), 64):
                with torch.autocast(device_type=encoder.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(**batch)
                emb = encoder.pool(out.last_hidden_state.float(), batch["attention_mask"])
                parts.append(emb @ old_w.T + old_b)
        old_logits = torch.cat(parts)
        old_right = old_cols[old_logits.argmax(1)] == y
        parent_acc = float(old_right.float().mean())
        # The parent's logits over its own labels, and which examples it gets right (MUSCLE's mask).
        old_logits = (old_logits, old_right)
    # Old-head targets for BCT: an example's label as the parent's column, -100 where the parent lacks it.
    old_target = torch.full_like(y, -100)
    for j, c in enumerate(old_cols.tolist()):
        old_target[y == c] = j
    opt, base_lrs = make_optimizer(model, [head_w, head_b], cfg)
    total = _total_steps(cfg, n, parent)
    warmup = max(1, int(total * cfg.warmup_frac))
    model.train()
    step, last_loss = 0, torch.tensor(float("nan"))
    order = list(range(n))
    while step < total:
        rng.shuffle(order)
        for idx, batch in _prefetched(inputs(order, cfg.batch_size)):
            if step >= total:
                break
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(f"stopped after {step} of {total} steps")
            with torch.autocast(device_type=encoder.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**batch)
            emb = encoder.pool(out.last_hidden_state.float(), batch["attention_mask"])
            logits = emb @ head_w.T + head_b
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if old_logits is not None and old_head is not None:
                loss = loss + _compatibility(
                    cfg, logits, emb, idx, old_logits, old_head, old_cols, old_target, y[idx]
                )
            optimizer_step(opt, base_lrs, loss, step, total, warmup)
            last_loss = loss.detach()  # read once at the end: a per-step .item() stalls the GPU queue
            step += 1
    model.eval()
    return TrainedAdapter(label_list, model, head_w.data, head_b.data, step, float(last_loss), parent_acc)


class _GivenHidden(torch.nn.Module):
    """Stands in for a model's embeddings: the hidden states passed as ``inputs_embeds`` go straight in."""

    def forward(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("the frozen layers' outputs must be passed as inputs_embeds")
        return inputs_embeds


class _FrozenPrefix:
    """The outputs of the frozen layers below the first adapted one, one unpadded row per training text.

    A LoRA in the top layers leaves the layers below it unchanged for the whole run, so their output for
    a text is computed once (in eval mode: no dropout there) instead of at every pass; each step then runs
    the adapted layers alone, on these rows. Rows are float16 (bf16 on GPU), padding rows are zeros: a
    padded position is masked as a key and in the pooling, so it changes no real token's output.
    """

    def __init__(self, model: PeftModel, first: int, dtype: torch.dtype):
        self.inner = model.get_base_model()
        self.first = first
        self.dtype = dtype
        self.rows: dict[int, torch.Tensor] = {}

    @classmethod
    def build(
        cls,
        model: PeftModel,
        encoder: Encoder,
        n_texts: int,
        tokenize: Callable[[Sequence[int]], None],
        token_ids: dict,
        use_bf16: bool,
    ):
        """A prefix for ``model``'s frozen layers, or None (LoRA from the first layer, an architecture
        without ``embeddings`` and ``encoder.layer``, or rows over ``FROZEN_CACHE_BYTES``)."""
        layers = model.peft_config["default"].layers_to_transform
        first = min(layers) if layers else 0
        inner = model.get_base_model()
        stack = getattr(inner, "encoder", None)
        if first == 0 or not hasattr(inner, "embeddings") or not hasattr(stack, "layer"):
            return None
        tokenize(range(n_texts))  # every text's ids, to size the rows
        dtype = torch.bfloat16 if use_bf16 else torch.float16
        size = sum(len(row) for row in token_ids.values()) * encoder.dim * dtype.itemsize
        return cls(model, first, dtype) if size <= FROZEN_CACHE_BYTES else None

    @contextlib.contextmanager
    def _only(self, layers: slice, given: bool):
        all_layers, embeddings = self.inner.encoder.layer, self.inner.embeddings
        self.inner.encoder.layer = torch.nn.ModuleList(list(all_layers)[layers])
        if given:
            self.inner.embeddings = _GivenHidden()
        try:
            yield
        finally:
            self.inner.encoder.layer = all_layers
            self.inner.embeddings = embeddings

    def fill(self, model: PeftModel, batches) -> None:
        """Run the frozen layers once over ``batches`` of (indices, tokenized inputs)."""
        training = model.training
        model.eval()
        device = next(model.parameters()).device
        bf16 = self.dtype == torch.bfloat16
        with torch.no_grad(), self._only(slice(0, self.first), given=False):
            for idx, batch in batches:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    hidden = model(**batch).last_hidden_state
                lengths = batch["attention_mask"].sum(1).tolist()
                for i, row, length in zip(idx, hidden, lengths, strict=True):
                    self.rows[i] = row[:length].to(self.dtype).clone()
        model.train(training)

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The model inputs of a batch: padded rows as ``inputs_embeds`` and their attention mask."""
        rows = [self.rows[i] for i in idx]
        hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).float()
        lengths = torch.tensor([len(r) for r in rows], device=hidden.device)
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).long()
        return {"inputs_embeds": hidden, "attention_mask": mask}

    def batches(self, order: Sequence[int], size: int):
        """(indices, ``collate``'s inputs) for each ``size`` texts of ``order``."""
        for start in range(0, len(order), size):
            idx = list(order[start : start + size])
            yield idx, self.collate(idx)

    def adapted_only(self):
        """While inside, the model runs its adapted layers alone, on ``collate``'s inputs."""
        return self._only(slice(self.first, None), given=True)


def _prefetched(source, depth: int = 3):
    """Run a batch generator on a loader thread, ``depth`` batches ahead (the Rust tokenizer and the
    copies release the GIL). Stops the loader when the consumer stops early."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def load() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as exc:  # surfaced in the training loop
            buffer.put(exc)

    thread = threading.Thread(target=load, name="driftserve-loader", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _compatibility(
    cfg: TrainConfig,
    logits: torch.Tensor,
    emb: torch.Tensor,
    idx: list[int],
    old: tuple[torch.Tensor, torch.Tensor],
    old_head: tuple[torch.Tensor, torch.Tensor],
    old_cols: torch.Tensor,
    old_target: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """MUSCLE distillation on the parent's correct examples + BCT influence loss (see the module doc)."""
    old_logits, old_right = old[0][idx], old[1][idx]
    extra = logits.new_zeros(())
    weights = distill_weights(
        cfg.distill_mask, old_right, logits.detach().argmax(1) != y, cfg.distill_focal_base
    )
    if cfg.distill_weight > 0 and bool((weights > 0).any()):
        t = cfg.distill_temperature
        new_logp = torch.log_softmax(logits[:, old_cols] / t, dim=1)
        old_p = torch.softmax(old_logits / t, dim=1)
        kl = (old_p * (torch.log(old_p.clamp_min(1e-12)) - new_logp)).sum(1)
        # Masks average over the samples they select; focal weights over the batch (as PCT does).
        norm = weights.sum() if cfg.distill_mask != "focal" else weights.new_tensor(float(len(idx)))
        extra = extra + cfg.distill_weight * t * t * (kl * weights).sum() / norm
    target = old_target[idx]
    if cfg.bct_weight > 0 and bool((target >= 0).any()):
        influence = emb @ old_head[0].T + old_head[1]
        extra = extra + cfg.bct_weight * torch.nn.functional.cross_entropy(
            influence, target, ignore_index=-100
        )
    return extra


DISTILL_MASKS = ("old_right", "flips", "focal")


def distill_weights(
    mask: str, old_right: torch.Tensor, new_wrong: torch.Tensor, focal_base: float = 0.2
) -> torch.Tensor:
    """Per-sample distillation weights of a batch for ``TrainConfig.distill_mask``."""
    if mask == "old_right":
        return old_right.float()
    if mask == "flips":
        return (old_right & new_wrong).float()
    if mask == "focal":
        return focal_base + old_right.float()
    raise ValueError(f"distill_mask must be one of {DISTILL_MASKS}, got {mask!r}")


def accuracy(head_probs: np.ndarray, head_labels: list[str], truth: Sequence[str]) -> float:
    if len(truth) == 0:
        return float("nan")
    pred = [head_labels[i] for i in head_probs.argmax(axis=1)]
    return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))
