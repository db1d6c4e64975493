"""FastTokenizer gives exactly the Hugging Face tokenizer's truncated, padded ids, for less work."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from serving.encoder import default_model_path
from serving.tokenization import FastTokenizer, PlainWordPiece, WordPrefix

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
    # Plain texts the word cache must split exactly like BERT's pre-tokenizer:
    "don't stop--e-mail me @ 10:30pm; cost: $5.99 (approx.) [sic] {ok} a_b c|d ~x^y `q` <p>",
    "[CLS] written in a text is the special token; [cls] and [Sep] are not",
    "[MASK]",
    (" " * 3000) + "words after a long run of spaces",  # a first chunk without any word
    "y" * 1500 + " tail",  # a first word longer than a chunk
    ",".join(["comma"] * 600),  # 3,500 characters without a space
    "\n".join(["line"] * 900),  # newlines separate words but are not where a chunk is cut
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
    # Not plain ASCII (the accent), so the Rust tokenizer and its word prefix take them.
    one_token_words = "café " + " ".join(["word"] * 400)
    for _ in range(10):
        fast([one_token_words])
    assert 30 <= prefix.words <= 45  # ~30 words fill the window; the margin stays modest
    long_words = "café " + " ".join(["antidisestablishmentarianism"] * 400)
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


def test_plain_texts_come_from_the_word_cache_and_the_rest_from_the_rust_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, 128)
    words = fast._words
    assert isinstance(words, PlainWordPiece)
    assert words.prefix == (tokenizer.cls_token_id,) and words.suffix == (tokenizer.sep_token_id,)
    assert words.plain("Great coffee, 5 stars!") and words.plain("")
    assert not words.plain("café") and not words.plain("a\x01b") and not words.plain("say [SEP] here")
    calls = []
    rust = fast.encodings
    fast.encodings = lambda texts: calls.append(list(texts)) or rust(texts)
    texts = ["Great coffee, 5 stars!", "café au lait", "Great tea."]
    ids, _ = fast(texts)
    assert calls == [["café au lait"]]  # only the text that is not plain reached the Rust tokenizer
    assert {"Great", "coffee,", "5", "stars!", "tea."} <= set(words._cache)  # tokens as written
    np.testing.assert_array_equal(ids, _reference(tokenizer, texts, 128)[0])


def test_the_word_cache_starts_over_when_full_and_keeps_the_ids(monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    monkeypatch.setattr(PlainWordPiece, "MAX_TOKENS", 8)
    fast = FastTokenizer(tokenizer, 64)
    texts = [" ".join(f"w{i}x{j}" for j in range(12)) for i in range(5)] + ["unbelievably " + "z" * 80]
    ids, _ = fast(texts)
    assert 0 < len(fast._words._cache) <= 8
    assert "z" * 80 not in fast._words._cache  # long words are not cached
    np.testing.assert_array_equal(ids, _reference(tokenizer, texts, 64)[0])


def test_tokenizers_without_bert_parts_keep_the_rust_path():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # groups punctuation runs, unlike BERT's
    assert PlainWordPiece.for_tokenizer(tok, 32) is None


@pytest.mark.parametrize("max_length", [8, 40, 128])
def test_random_plain_ascii_matches_the_hugging_face_tokenizer(max_length):
    import string

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    fast = FastTokenizer(tokenizer, max_length)
    rng = np.random.default_rng(max_length)
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + " \t\n\r")
    fragments = ["[CLS]", "[SEP", "[mask]", "UNK]", "un##able", "e-mail", "A.B.C.", "x" * 120, "Ünïcode"]
    texts = []
    for _ in range(400):
        n = int(rng.integers(0, 300))
        chars = rng.choice(alphabet, size=n, p=None).tolist()
        words = "".join(chars).split(" ")
        if rng.random() < 0.3:
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(fragments)))
        texts.append(" ".join(words))
    assert sum(fast._words.plain(t) for t in texts) > 250  # most take the word cache
    _assert_same_in_chunks(fast, tokenizer, texts, max_length, chunk=50)
    _assert_same_in_chunks(fast, tokenizer, texts, max_length, chunk=50)  # again, from the cache


def test_release_gil_sends_every_text_through_the_rust_tokenizer_with_the_same_ids():
    """A GPU learner's loader thread tokenizes without the GIL: no text goes through the Python word cache,
    and the ids are those of the default path."""
    from serving.encoder import Encoder

    enc = Encoder(max_length=64)
    texts = EDGE_CASES + [" ".join(["Spam, spam and eggs!"] * n) for n in (1, 10, 100)] + ["Great tea."]
    words = enc._tok._words
    words._cache.clear()
    released = enc.token_ids(texts, release_gil=True)
    assert not words._cache  # the word cache was never consulted
    default = enc.token_ids(texts)
    assert words._cache  # while the default path fills it
    assert len(released) == len(default)
    for a, b in zip(released, default, strict=True):
        np.testing.assert_array_equal(a, b)
