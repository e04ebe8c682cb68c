"""Each token of a family processor's vocabulary as bytes: what OpenAI's ``logprobs`` report per token (``token``,
``bytes``) and what a grammar engine needs to know which tokens may continue a text (``qwenvl_core.grammar``).

This module owns
- ``Vocabulary``: the bytes of every token id of one tokenizer (special tokens: their surface form, flagged as
  special), its size and an ``encode`` of text to ids, built once per processor (``vocabulary(processor)``, cached;
  ``row_vocabulary``: only for rows that need it);
- ``token_text``: a token's bytes as the ``token`` string OpenAI sends (``bytes:\\xNN...`` when the bytes are not
  whole UTF-8, as a byte-level BPE token inside a multi-byte character is);
- ``TokenLogprob`` / ``describe_logprobs``: a row's recorded log-probabilities (ids, from
  ``qwenvl_core.generation``) as plain, picklable records with the tokens' text and bytes.

Both tokenizer kinds are byte-level BPE: the v1 tiktoken ``QWenTokenizer`` gives a token's bytes directly
(``decode_token``); a transformers tokenizer's token strings are bytes in GPT-2's printable byte alphabet.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LOGPROB_FLOOR = -9999.0  # OpenAI's value for a token that cannot occur (JSON has no -Infinity)


@dataclass(frozen=True, eq=False)  # identity hash: a cache key without hashing 150k tokens
class Vocabulary:
    """``tokens[i]``: the bytes of id ``i`` (b"" for ids the tokenizer does not define); ``special``: the ids of
    special tokens (whose bytes are their surface form); ``encode``: text to ids (ordinary text only)."""

    tokens: tuple[bytes, ...]
    special: frozenset[int]
    encode: Callable[[str], list[int]]

    def __len__(self) -> int:
        return len(self.tokens)

    def bytes_of(self, token_id: int) -> bytes:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else b""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One output token with its log-probability and the most likely alternatives at its step (OpenAI's shape)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


_CACHE: weakref.WeakKeyDictionary[Any, Vocabulary] = weakref.WeakKeyDictionary()


def vocabulary(processor: Any) -> Vocabulary:
    """The vocabulary of ``processor``'s tokenizer (built on first use, then cached for that processor)."""
    try:
        return _CACHE[processor]
    except KeyError:
        pass
    tokenizer = processor.tokenizer
    vocab = _tiktoken_vocabulary(tokenizer) if hasattr(tokenizer, "decode_token") else _hf_vocabulary(tokenizer)
    _CACHE[processor] = vocab
    return vocab


def row_vocabulary(params: Any, processor: Any) -> Vocabulary | None:
    """The vocabulary a row with these ``SamplingParams`` needs (a grammar; logprobs' token bytes), or None; the
    serving engine calls it while preparing a request, so a first build happens there, not on the model thread."""
    return vocabulary(processor) if params.grammar or params.logprobs is not None else None


def _tiktoken_vocabulary(tokenizer: Any) -> Vocabulary:
    """The v1 ``QWenTokenizer``: ranks, then the special tokens."""
    tokens = tuple(tokenizer.decode_token(i) for i in range(tokenizer.vocab_size))
    special = frozenset(range(tokenizer.n_ranks, tokenizer.vocab_size))
    return Vocabulary(tokens, special, tokenizer.encode_ordinary)


def _hf_vocabulary(tokenizer: Any) -> Vocabulary:
    """A transformers byte-level BPE tokenizer: token strings are bytes in GPT-2's printable alphabet; added
    tokens are their content as UTF-8."""
    byte_of = {char: byte for byte, char in enumerate(_byte_alphabet())}
    size = len(tokenizer)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))

    def as_bytes(i: int, s: str | None) -> bytes:
        if i in added:
            return added[i].encode()
        if s is None:
            return b""
        return bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode()

    tokens = tuple(as_bytes(i, s) for i, s in enumerate(strings))
    special = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return Vocabulary(tokens, special, lambda text: tokenizer.encode(text, add_special_tokens=False))


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (byte-level BPE vocabularies are written in it): printable
    Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def token_text(data: bytes) -> str:
    """A token's bytes as OpenAI's ``token`` string: the text when the bytes are whole UTF-8, else ``bytes:`` and
    the bytes escaped (``bytes:\\xe4\\xbd``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def describe_logprobs(vocab: Vocabulary, steps: Sequence[Any]) -> list[TokenLogprob]:
    """``generation.StepLogprobs`` records (token id, log-probability, top (id, log-probability) pairs) as
    ``TokenLogprob``s with the tokens' text and bytes."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        data = vocab.bytes_of(token_id)
        return TopLogprob(token_text(data), tuple(data), max(logprob, LOGPROB_FLOOR))

    out = []
    for step in steps:
        data = vocab.bytes_of(step.token_id)
        out.append(TokenLogprob(token_text(data), tuple(data), max(step.logprob, LOGPROB_FLOOR),
                                tuple(top(i, lp) for i, lp in step.top)))
    return out
