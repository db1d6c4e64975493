"""Tokenization for serving and training: the Hugging Face tokenizer's tokens, for less CPU.

On a GPU, tokenizing ~1,000-character texts costs more than the bf16 forward of MiniLM, so the serving
rate is set by this module. ``FastTokenizer`` gives exactly the ids of
``tokenizer(texts, truncation=True, max_length=..., padding=True)`` (unit tests compare them on the shipped
streams and on edge cases) with these savings:

- plain texts (ASCII without control characters or special-token strings) are split at whitespace here
  and each token's ids come from a cache (``PlainWordPiece``): for them BERT's normalizer only
  lowercases (cleaning, accent stripping and CJK spacing change nothing in ASCII), its pre-tokenizer
  splits at whitespace and around each punctuation character, and WordPiece maps a word to the same ids
  every time. Splitting stops once the window is full;
- other texts go to the Rust tokenizer directly, without character offsets, and long ones are tokenized
  from a prefix of their words (``WordPrefix``); padding is done in numpy.
"""

from __future__ import annotations

import copy
import itertools
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


def _plain_ascii(text: str) -> bool:
    """ASCII without the control characters BERT's cleaning removes (``isprintable`` rules out every
    control character at once; only a text with \t, \n or \r needs the closer look)."""
    return text.isascii() and (text.isprintable() or not _ASCII_CONTROL.search(text))


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


class PlainWordPiece:
    """BERT-style tokenization of plain texts from a cache of whitespace-separated token -> ids.

    Applies only to a tokenizer whose normalizer is BERT's, whose pre-tokenizer is BERT's and whose model
    is WordPiece, and whose post-processor wraps a single text's ids in fixed special tokens (checked on
    sample texts when built). A text is plain when ``plain`` says so: ASCII, no control characters, and
    none of the tokenizer's added tokens (``[CLS]`` written in a text is that token to the tokenizer).

    For such a text BERT's normalizer only lowercases, and its pre-tokenizer splits at whitespace and
    around each punctuation character, so the ids of a whitespace-separated token (``"Coffee,"``) never
    depend on its neighbours: they are computed once and cached under the token as written.
    """

    # BERT's pre-tokenizer on plain ASCII: runs of letters and digits, and each other visible character
    # alone (every ASCII character that is not alphanumeric or a space is punctuation to BERT).
    _WORDS = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]")
    MAX_TOKENS = 65_536  # cached tokens (~290 bytes each: ~19 MB at most); the cache starts over past this
    MAX_CACHED_CHARS = 64  # longer tokens are split each time (they are rare and would bloat the cache)

    def __init__(self, backend: Tokenizer, max_length: int, lowercase: bool) -> None:
        self._model = backend.model
        self._lowercase = lowercase
        self._cache: dict[str, tuple[int, ...]] = {}
        self.prefix, self.suffix = self._specials(backend)
        self.limit = max_length - len(self.suffix)  # ids before the suffix, the prefix included
        added = [t for t in json.loads(backend.to_str()).get("added_tokens") or [] if t.get("content")]
        self._raw_added = [t["content"] for t in added if not t.get("normalized")]
        self._norm_added = [t["content"].lower() for t in added if t.get("normalized")]
        # A text holding none of these characters holds no added token (a cheap first look).
        firsts = {t[0] for t in self._raw_added} | {t[0] for t in self._norm_added}
        self._added_firsts = sorted(firsts | {c.upper() for c in firsts})

    @classmethod
    def for_tokenizer(cls, backend: Tokenizer, max_length: int) -> PlainWordPiece | None:
        spec = json.loads(backend.to_str())
        parts = [(spec.get(part) or {}).get("type") for part in ("normalizer", "pre_tokenizer", "model")]
        if parts != ["BertNormalizer", "BertPreTokenizer", "WordPiece"]:
            return None
        norm = spec["normalizer"]
        try:
            words = cls(backend, max_length, lowercase=bool(norm.get("lowercase", True)))
        except ValueError:  # a post-processor that is not a fixed wrapper
            return None
        return words if len(words.prefix) + len(words.suffix) < max_length else None

    def _specials(self, backend: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the post-processor puts before and after a text's own, checked on sample texts."""
        probe = copy.deepcopy(backend)
        probe.no_truncation()
        probe.no_padding()
        empty = list(probe.encode("").ids)
        for sample in ("hello", "Hello, world: 2 tests!"):
            words = self._WORDS.findall(sample.lower() if self._lowercase else sample)
            own = [t.id for word in words for t in self._model.tokenize(word)]
            full = list(probe.encode(sample).ids)
            at = next((p for p in range(len(full) - len(own) + 1) if full[p : p + len(own)] == own), None)
            if not own or at is None or full[:at] + full[at + len(own) :] != empty:
                raise ValueError("the post-processor does not wrap a text's ids in fixed tokens")
            prefix, suffix = tuple(full[:at]), tuple(full[at + len(own) :])
        return prefix, suffix

    def _token(self, token: str) -> tuple[int, ...]:
        """A whitespace-separated token's ids (at most ``limit`` of them), cached when short."""
        ids = self._cache.get(token)
        if ids is not None:
            return ids
        text = token.lower() if self._lowercase else token
        out: list[int] = []
        for word in self._WORDS.finditer(text):
            out += [t.id for t in self._model.tokenize(word.group())]
            if len(out) >= self.limit:  # a long run without spaces: the window is full
                break
        ids = tuple(out)
        if len(token) <= self.MAX_CACHED_CHARS:
            if len(self._cache) >= self.MAX_TOKENS:
                self._cache.clear()
            self._cache[token] = ids
        return ids

    def plain(self, text: str) -> bool:
        if not _plain_ascii(text):
            return False
        if any(c in text for c in self._added_firsts):
            if any(t in text for t in self._raw_added):
                return False
            if self._norm_added and any(t in text.lower() for t in self._norm_added):
                return False
        return True

    def __call__(self, text: str) -> list[int]:
        """A plain text's ids, truncated to the window like the tokenizer's (the tail is dropped)."""
        ids = list(self.prefix)
        limit, get = self.limit, self._cache.get
        # Every token has at least one id ([UNK] at worst): the first ``limit`` tokens fill the window.
        for token in text.split(None, limit)[:limit]:
            piece = get(token)
            ids += piece if piece is not None else self._token(token)
            if len(ids) >= limit:
                break
        del ids[limit:]
        ids += self.suffix
        return ids


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
        self._words = PlainWordPiece.for_tokenizer(backend, max_length)

    def _routed(self, texts: list[str]) -> list[Encoding]:
        """Plain texts through the lighter normalizer, the others through the tokenizer's own."""
        if self._plain is None:
            return self._full(texts)
        plain = [i for i, t in enumerate(texts) if _plain_ascii(t)]
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

    def ids(self, texts: Sequence[str], release_gil: bool = False) -> list[Sequence[int]]:
        """Each text's ids, truncated but unpadded: plain texts from the word cache, the rest through the
        Rust tokenizer. ``release_gil``: every text through the Rust tokenizer, which releases the GIL
        while it works (same ids). The word cache costs less CPU but is Python: on a loader thread beside
        a GPU training loop it holds the GIL the loop needs to launch its kernels."""
        texts = list(texts)
        if self._words is None or release_gil:
            return [e.ids for e in self.encodings(texts)]
        out: list[Sequence[int]] = [()] * len(texts)
        other = []
        for i, text in enumerate(texts):
            if self._words.plain(text):
                out[i] = self._words(text)
            else:
                other.append(i)
        if other:
            for i, enc in zip(other, self.encodings([texts[i] for i in other]), strict=True):
                out[i] = enc.ids
        return out

    def token_ids(self, texts: Sequence[str], release_gil: bool = False) -> list[np.ndarray]:
        """Each text's ids, truncated but unpadded (``release_gil``: see ``ids``)."""
        return [np.asarray(r, dtype=np.int64) for r in self.ids(texts, release_gil)]

    def pad(self, rows: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of rows padded to the longest."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max()) if len(rows) else 0
        filled = np.arange(width) < lengths[:, None]
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        flat = itertools.chain.from_iterable(rows)
        ids[filled] = np.fromiter(flat, dtype=np.int64, count=int(lengths.sum()))
        return ids, filled.astype(np.int64)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.ids(texts))
