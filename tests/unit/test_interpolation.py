"""Weight interpolation toward the parent on a tiny real BERT: the end points are exactly the parent and
the trained weights, and the chosen alpha comes from the grid with its holdout scores."""

from __future__ import annotations

import numpy as np
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from learners import artifacts
from learners.buffer import Example
from learners.interpolation import Interpolator, choose_alpha, choose_alpha_on
from learners.trainer import TrainConfig, train_adapter
from serving.artifacts import load_artifact
from streams.schemas import ArtifactManifest

CFG = TrainConfig(epochs=1, batch_size=8, max_steps=3, lr=5e-2, head_lr=5e-2)
TEXTS = [f"{w} thing {i}" for i, w in enumerate(["good", "bad"] * 12)]
LABELS = ["pos" if i % 2 == 0 else "neg" for i in range(24)]


def _parent(tmp_path, encoder):
    trained = train_adapter(encoder, TEXTS, LABELS, CFG)
    manifest = ArtifactManifest(
        domain="d", version="v1", base_fingerprint=encoder.fingerprint, labels=trained.labels, files={}
    )
    path = artifacts.publish(tmp_path, manifest, trained.write)
    return load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim)


def test_end_points_are_the_parent_and_the_trained_weights(tmp_path, tiny_encoder):
    parent = _parent(tmp_path, tiny_encoder)
    child = train_adapter(tiny_encoder, [*TEXTS, "meh thing"], [*LABELS, "neutral"], CFG, parent=parent)
    trained_state = {k: v.clone() for k, v in get_peft_model_state_dict(child.model).items()}
    trained_w = child.head_weight.clone()
    interp = Interpolator(child, parent)
    interp.set(0.0)
    old = load_file(str(parent.adapter_dir / "adapter_model.safetensors"))
    for k, v in get_peft_model_state_dict(child.model).items():
        torch.testing.assert_close(v, old[k])
    rows = [child.labels.index(lab) for lab in parent.head.labels]
    np.testing.assert_allclose(child.head_weight[rows].numpy(), parent.head.weight, rtol=0, atol=1e-6)
    # A label the parent never had keeps its trained row at every alpha.
    new_row = child.labels.index("neutral")
    torch.testing.assert_close(child.head_weight[new_row], trained_w[new_row])
    interp.set(0.5)
    mid = get_peft_model_state_dict(child.model)
    k = next(k for k in mid if "lora_A" in k)
    torch.testing.assert_close(mid[k], (old[k] + trained_state[k]) / 2)
    interp.set(1.0)
    for k, v in get_peft_model_state_dict(child.model).items():
        torch.testing.assert_close(v, trained_state[k])
    torch.testing.assert_close(child.head_weight, trained_w)


def test_choose_alpha_picks_from_the_grid_and_reports_each_point(tmp_path, tiny_encoder):
    parent = _parent(tmp_path, tiny_encoder)
    child = train_adapter(tiny_encoder, TEXTS, LABELS, CFG, parent=parent)
    choice = choose_alpha(tiny_encoder, child, parent, TEXTS[:8], LABELS[:8], grid=(0.5, 1.0))
    assert choice.alpha in (0.5, 1.0)
    assert set(choice.scores) == {0.5, 1.0}
    assert all(0.0 <= s["nfr"] <= 1.0 and 0.0 <= s["accuracy"] <= 1.0 for s in choice.scores.values())
    assert choose_alpha(tiny_encoder, child, parent, [], []).alpha == 1.0
    held_out = [
        Example(f"h{i}", t, lab, 0.0) for i, (t, lab) in enumerate(zip(TEXTS[:8], LABELS[:8], strict=True))
    ]
    assert choose_alpha_on(tiny_encoder, child, parent, held_out, (0.5, 1.0)) == choice.alpha
    assert choose_alpha_on(tiny_encoder, child, parent, [], (0.5, 1.0)) is None
    assert choose_alpha_on(tiny_encoder, child, parent, held_out, ()) is None


def test_muscle_flip_mask_trains_a_continued_run(tmp_path, tiny_encoder):
    from dataclasses import replace

    parent = _parent(tmp_path, tiny_encoder)
    cfg = replace(CFG, distill_mask="flips", distill_weight=1.0)
    child = train_adapter(tiny_encoder, TEXTS, LABELS, cfg, parent=parent)
    assert np.isfinite(child.final_loss) and child.steps == 3


def test_a_continued_run_makes_its_own_number_of_passes(tmp_path, tiny_encoder):
    """``continued_epochs`` sets the passes of a run from a parent only; a first run keeps ``epochs``."""
    from dataclasses import replace

    parent = _parent(tmp_path, tiny_encoder)
    cfg = replace(CFG, epochs=3, continued_epochs=1, max_steps=100)  # 24 texts, batch 8: 3 steps a pass
    assert train_adapter(tiny_encoder, TEXTS, LABELS, cfg).steps == 9
    assert train_adapter(tiny_encoder, TEXTS, LABELS, cfg, parent=parent).steps == 3
    assert (
        train_adapter(tiny_encoder, TEXTS, LABELS, replace(cfg, continued_epochs=None), parent=parent).steps
        == 9
    )
