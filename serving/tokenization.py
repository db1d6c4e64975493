"""Tokenization for serving and training: the Hugging Face tokenizer's tokens, for less CPU.

On a GPU, tokenizing ~1,000-character texts costs more than the bf16 forward of MiniLM, so the serving
rate is set by this module. ``FastTokenizer`` gives exactly the ids of
``tokenizer(texts, truncation=True, max_length=..., padding=True)`` (unit tests compare them on the shipped
streams and on edge cases) with three savings:

- the Rust tokenizer is called directly, without character offsets, and padding is done in numpy;
- plain texts (ASCII without control characters) skip BERT's normalizer, which for them only lowercases
  (cleaning, accent stripping and CJK spacing change nothing in ASCII);
- long texts are tokenized from a prefix of their words (``WordPrefix``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer, normalizers

# Pre-tokenizers that never let a token span an ASCII space, so the tokens of a text cut at a space are a
# prefix of the tokens of the whole text (with per-character normalizers such as BERT's).
_SPACE_LOCAL_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
# ASCII characters BERT's ``clean_text`` removes or rewrites (controls; \t \n \r only become spaces,
# which the pre-tokenizer splits on anyway).
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

Encode = Callable[[list[str]], list[Encoding]]


def _encode_batch(tokenizer: Tokenizer) -> Encode:
    """The Rust batch encoder, without character offsets where the tokenizers release has that."""
    return getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch


def _plain_variant(tokenizer: Tokenizer) -> Tokenizer | None:
    """The same tokenizer with a normalizer that treats plain ASCII alike, or None if there is none."""
    spec = json.loads(tokenizer.to_str()).get("normalizer")
    if spec is None:
        return tokenizer
    if spec.get("type") != "BertNormalizer":
        return None
    plain = copy.deepcopy(tokenizer)
    plain.normalizer = normalizers.Lowercase() if spec.get("lowercase", True) else None
    return plain


class WordPrefix:
    """Tokenize long texts from a prefix of their words: a review of 2,000 words truncated to 128 tokens
    needs only its first hundred or so words tokenized.

    A text of more than ``words`` space-separated words is cut at a space. If the cut text still fills the
    window, its tokens are exactly those of the whole text (a token never spans a space); otherwise the
    whole text is tokenized again. ``words`` follows how many words recent texts needed to fill the window
    (with a margin), so retries stay rare; the tokens never depend on it.
    """

    def __init__(self, max_length: int, special: int) -> None:
        self.special = special  # tokens the post-processor adds ([CLS], [SEP])
        self.window = max_length - special  # content tokens that fit
        self.words = self.window  # at least one token per word, so usually enough; adapts from here
        self.retries = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, max_length: int) -> WordPrefix | None:
        spec = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
        if spec.get("type") not in _SPACE_LOCAL_PRE_TOKENIZERS:
            return None
        post = tokenizer.post_processor
        special = post.num_special_tokens_to_add(False) if post is not None else 0
        return cls(max_length, special) if max_length > special else None

    def encode(self, encode: Encode, texts: Sequence[str]) -> list[Encoding]:
        words = self.words
        inputs = list(texts)
        cut = []
        for i, text in enumerate(inputs):
            if text.count(" ") >= words:
                inputs[i] = " ".join(text.split(" ", words)[:words])
                cut.append(i)
        encs = encode(inputs)
        if not cut:
            return encs
        short = [i for i in cut if len(encs[i].ids) - self.special < self.window]
        if short:  # the prefix did not fill the window: the whole text decides
            self.retries += len(short)
            for i, enc in zip(short, encode([texts[i] for i in short]), strict=True):
                encs[i], inputs[i] = enc, texts[i]
        # Words each cut text needed to fill the window, from its tokens per word (window + overflow).
        needed = sorted(
            self.window * (inputs[i].count(" ") + 1) / (self.window + self._overflow(encs[i])) for i in cut
        )
        target = math.ceil(1.2 * needed[(len(needed) * 9) // 10]) + 4
        self.words = max(8, round(0.7 * self.words + 0.3 * target))
        return encs

    def _overflow(self, enc: Encoding) -> int:
        return sum(len(o.ids) - self.special for o in enc.overflowing)


class FastTokenizer:
    """Texts -> int64 ``input_ids`` and ``attention_mask``, truncated to ``max_length`` (the tail is
    dropped) and padded to the longest text of the batch."""

    def __init__(self, hf_tokenizer, max_length: int) -> None:
        backend = copy.deepcopy(hf_tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = int(hf_tokenizer.pad_token_id or 0)
        self._full = _encode_batch(backend)
        plain = _plain_variant(backend)
        self._plain = _encode_batch(plain) if plain is not None else None
        self._prefix = WordPrefix.for_tokenizer(backend, max_length)

    def _routed(self, texts: list[str]) -> list[Encoding]:
        """Plain texts through the lighter normalizer, the others through the tokenizer's own."""
        if self._plain is None:
            return self._full(texts)
        plain = [i for i, t in enumerate(texts) if t.isascii() and not _ASCII_CONTROL.search(t)]
        if len(plain) == len(texts):
            return self._plain(texts)
        out = self._full(texts) if not plain else [None] * len(texts)
        if plain:
            keep = set(plain)
            other = [i for i in range(len(texts)) if i not in keep]
            for i, enc in zip(plain, self._plain([texts[i] for i in plain]), strict=True):
                out[i] = enc
            for i, enc in zip(other, self._full([texts[i] for i in other]), strict=True):
                out[i] = enc
        return out  # type: ignore[return-value]

    def encodings(self, texts: Sequence[str]) -> list[Encoding]:
        texts = list(texts)
        return self._prefix.encode(self._routed, texts) if self._prefix is not None else self._routed(texts)

    def token_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids, truncated but unpadded."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self.encodings(texts)]

    def pad(self, rows: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of rows padded to the longest."""
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad([e.ids for e in self.encodings(texts)])
