"""Shared fixtures. Markers come from the folder: tests/unit -> unit, tests/integration -> integration,
tests/e2e -> e2e."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

_FOLDERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in _FOLDERS:
            if folder in parts:
                item.add_marker(getattr(pytest.mark, folder))


def wait_for(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value; the value is returned. No fixed sleeps."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A real BERT with random weights (2 layers, hidden 32) and the bundled MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from serving.encoder import default_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_mpnet_dir(tmp_path_factory) -> str:
    """Another architecture and width (MPNet, 2 layers, hidden 48, random weights), same tokenizer."""
    import torch
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from serving.encoder import default_model_path

    out = tmp_path_factory.mktemp("tiny-mpnet")
    cfg = MPNetConfig(
        vocab_size=30527,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    torch.manual_seed(2)
    MPNetModel(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from serving.encoder import Encoder

    return Encoder(tiny_model_dir, max_length=32)
