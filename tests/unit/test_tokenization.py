"""FastTokenizer gives exactly the Hugging Face tokenizer's truncated, padded ids, for less work."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from serving.encoder import default_model_path
from serving.tokenization import FastTokenizer, WordPrefix

# The shared replay streams sit beside a development checkout (not in CI's clone): checked where present.
STREAMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "streams"

EDGE_CASES = [
    "",
    " ",
    "a",
    "Plain ASCII, with punctuation!!! and CAPITALS.",
    "tabs\tand\nnew lines\r\nand  double   spaces",
    "control\x01chars\x7fremoved\x0bhere\x0c",
    "Accents: café naïve ÉCOLE, and CJK 你好世界 mixed in",
    "emoji 😀 and replacement \ufffd and zero\u200bwidth",
    " ".join(["word"] * 500),  # long, one token per word
    " ".join(["antidisestablishmentarianism"] * 300),  # long, many tokens per word
    "x" * 5000,  # one huge word ([UNK])
    ("\x01 " * 300) + " ".join(["tail"] * 200),  # leading words that yield no tokens at all
    "  ".join(["spaced"] * 400),  # empty words between double spaces
]


def _stream_texts(name: str, n: int) -> list[str]:
    path = STREAMS / name
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    with gzip.open(path, "rt") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh, strict=False)]


def _reference(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)


def _assert_same_in_chunks(fast, tokenizer, texts: list[str], max_length: int, chunk: int) -> None:
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        ids, mask = fast(part)
        ref_ids, ref_mask = _reference(tokenizer, part, max_length)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)


@pytest.mark.parametrize("max_length", [16, 128])
def test_edge_cases_match_the_hugging_face_tokenizer(max_length):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, max_length)
    for _ in range(3):  # the word prefix adapts between calls; the ids must not change with it
        ids, mask = fast(EDGE_CASES)
        ref_ids, ref_mask = _reference(tokenizer, EDGE_CASES, max_length)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
    for text in EDGE_CASES:  # alone as well: batches of only plain or only other texts
        np.testing.assert_array_equal(fast([text])[0], _reference(tokenizer, [text], max_length)[0])


@pytest.mark.parametrize(
    "stream", ["reviews-finefood.jsonl.gz", "spam-2002.jsonl.gz", "tweets-client.jsonl.gz"]
)
def test_shipped_streams_match_the_hugging_face_tokenizer(stream):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, 128)
    _assert_same_in_chunks(fast, tokenizer, _stream_texts(stream, 600), 128, chunk=100)


def test_demo_data_and_random_mixed_texts_match_the_hugging_face_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, 48)
    demo = Path(__file__).resolve().parents[2] / "ops" / "data" / "demo.jsonl"
    texts = [json.loads(line)["text"] for line in demo.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    pieces = [
        "the",
        "Tokenizer",
        "naïve",
        "ÜBER",
        "x\x01y",
        "你好",
        "e-mail",
        "don't",
        "\t",
        "  ",
        "😀",
        "12,345",
    ]
    texts += [" ".join(rng.choice(pieces, size=int(rng.integers(1, 120)))) for _ in range(200)]
    _assert_same_in_chunks(fast, tokenizer, texts, 48, chunk=64)


def test_word_prefix_cuts_long_texts_and_retries_when_the_prefix_falls_short():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, 32)
    prefix = fast._prefix
    assert isinstance(prefix, WordPrefix) and prefix.window == 30
    one_token_words = " ".join(["word"] * 400)
    for _ in range(10):
        fast([one_token_words])
    assert 30 <= prefix.words <= 45  # ~30 words fill the window; the margin stays modest
    long_words = " ".join(["antidisestablishmentarianism"] * 400)
    for _ in range(10):
        fast([long_words])
    assert prefix.words < 20  # several tokens per word: fewer words are tokenized
    retries = prefix.retries
    ids, _ = fast([one_token_words])  # too few words now: tokenized again from the whole text
    assert prefix.retries == retries + 1
    np.testing.assert_array_equal(ids, _reference(tokenizer, [one_token_words], 32)[0])


def test_encoder_and_training_ids_agree():
    from serving.encoder import Encoder

    enc = Encoder(max_length=64)
    texts = EDGE_CASES + [" ".join(["Spam, spam and eggs!"] * n) for n in (1, 10, 100)]
    batch = enc.tokenize(texts)
    rows = enc.token_ids(texts)
    collated = enc.collate(rows)
    np.testing.assert_array_equal(batch["input_ids"].numpy(), collated["input_ids"].numpy())
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), collated["attention_mask"].numpy())
