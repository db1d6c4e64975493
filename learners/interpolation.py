"""Weight interpolation toward the parent: the last compatibility step of a continued training run.

A continued run ends at weights w_new; the served model becomes w_a = w_parent + alpha*(w_new - w_parent)
(LoRA A/B matrices and the head rows the parent has; rows of labels new to this run stay as trained).
Backward-compatible weight interpolation (Schumann et al., 2023) found that such a point between the old
and the fine-tuned model keeps most of the accuracy gain while removing many negative flips: the flips
of a fine-tune are largely samples near the old decision boundary that the update pushed across by noise,
and interpolation undoes those small moves first while the large, consistent ones survive.

``alpha`` is chosen on the run's held-out newest feedback with the head alone (no memory, no extra
model load): each grid point costs one forward pass over the holdout. The rule counts a negative flip
twice as heavily as a positive one (score = PFR - 2*NFR, i.e. accuracy gain - NFR), ties to the larger alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from learners.trainer import TrainedAdapter
from serving.artifacts import Artifact
from serving.encoder import Encoder

DEFAULT_GRID = (0.4, 0.6, 0.8, 1.0)
NFR_COST = 2.0  # a negative flip costs this many positive flips


@dataclass(frozen=True)
class InterpolationChoice:
    alpha: float
    scores: dict[float, dict[str, float]]  # alpha -> holdout accuracy, nfr, pfr (head alone)


class Interpolator:
    """Moves a trained adapter between its parent (alpha 0) and its trained weights (alpha 1), in place."""

    def __init__(self, trained: TrainedAdapter, parent: Artifact) -> None:
        self.trained = trained
        model = trained.model
        self._new = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        old = load_file(str(parent.adapter_dir / "adapter_model.safetensors"))
        device = next(iter(self._new.values())).device
        self._old = {k: old[k].to(device) for k in self._new if k in old}
        self._head_w = trained.head_weight.detach().clone()
        self._head_b = trained.head_bias.detach().clone()
        rows = [trained.labels.index(lab) for lab in parent.head.labels]
        self._rows = torch.tensor(rows, dtype=torch.long, device=self._head_w.device)
        self._old_w = torch.from_numpy(parent.head.weight).float().to(self._head_w.device)
        self._old_b = torch.from_numpy(parent.head.bias).float().to(self._head_w.device)

    def set(self, alpha: float) -> None:
        state = {
            k: (self._old[k] + alpha * (v - self._old[k])) if k in self._old else v
            for k, v in self._new.items()
        }
        set_peft_model_state_dict(self.trained.model, state)
        w, b = self._head_w.clone(), self._head_b.clone()
        w[self._rows] = self._old_w + alpha * (self._head_w[self._rows] - self._old_w)
        b[self._rows] = self._old_b + alpha * (self._head_b[self._rows] - self._old_b)
        self.trained.head_weight.data.copy_(w)
        self.trained.head_bias.data.copy_(b)

    def predict(self, encoder: Encoder, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        """Head-alone class indices (into ``trained.labels``) at the current alpha."""
        model = self.trained.model
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                enc = encoder.collate(encoder.token_ids(list(texts[start : start + batch])))
                hidden = model(**enc).last_hidden_state
                emb = encoder.pool(hidden.float(), enc["attention_mask"])
                out.append((emb @ self.trained.head_weight.T + self.trained.head_bias).argmax(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def choose_alpha(
    encoder: Encoder,
    trained: TrainedAdapter,
    parent: Artifact,
    texts: Sequence[str],
    labels: Sequence[str],
    grid: Sequence[float] = DEFAULT_GRID,
) -> InterpolationChoice:
    """Pick alpha on held-out (texts, labels) and leave ``trained`` at it. Without a holdout: alpha = 1."""
    interp = Interpolator(trained, parent)
    if not len(texts) or not grid:
        interp.set(1.0)
        return InterpolationChoice(1.0, {})
    index = {lab: i for i, lab in enumerate(trained.labels)}
    truth = np.array([index.get(lab, -1) for lab in labels])
    interp.set(0.0)
    old_right = interp.predict(encoder, texts) == truth
    scores: dict[float, dict[str, float]] = {}
    best, best_key = 1.0, -np.inf
    for alpha in sorted(grid):
        interp.set(alpha)
        right = interp.predict(encoder, texts) == truth
        nfr = float(np.mean(old_right & ~right))
        pfr = float(np.mean(~old_right & right))
        scores[alpha] = {"accuracy": float(right.mean()), "nfr": nfr, "pfr": pfr}
        key = pfr - NFR_COST * nfr
        if key >= best_key - 1e-12:
            best, best_key = alpha, key
    interp.set(best)
    return InterpolationChoice(best, scores)


def choose_alpha_on(
    encoder: Encoder, trained: TrainedAdapter, parent: Artifact, held_out, grid
) -> float | None:
    """``choose_alpha`` on held-out examples (``.text``, ``.label``); None, and ``trained`` untouched,
    without a holdout or a grid."""
    if not held_out or not grid:
        return None
    return choose_alpha(
        encoder, trained, parent, [e.text for e in held_out], [e.label for e in held_out], grid
    ).alpha
