"""Constrained decoding: outputs that parse as JSON (OpenAI's ``response_format``), through llguidance.

This module owns
- ``json_grammar(schema)``: a JSON schema (``None``: any JSON object, OpenAI's ``json_object``) compiled to an
  llguidance grammar, a tokenizer-independent string that travels inside ``SamplingParams`` (so across processes
  to a serving replica); an unsupported or malformed schema is a ``GrammarError`` with llguidance's reason.
  Output JSON is compact (no free whitespace between tokens: a model cannot loop on blanks);
- ``GrammarConstraint``: one row's matcher over one ``Vocabulary`` (``qwenvl_core.vocabulary``), with the row's
  stop ids as the end of the text: once the JSON is complete only a stop id is allowed, so the row ends "stop";
- ``allowed_tokens(constraints, vocab_size, device)``: the next-token masks of several rows at once (computed in
  parallel by llguidance's executor into one bitmask, unpacked on the logits' device): ``[B, V]`` bool.

llguidance (Rust, no dependencies) is imported only when a grammar is used.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qwenvl_core.devices import queued_copy
from qwenvl_core.errors import QwenVLError
from qwenvl_core.vocabulary import Vocabulary

SPECIAL_MARKER = b"\xff"  # llguidance's prefix for special tokens: never matched by grammar text
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(QwenVLError):
    """A schema llguidance cannot compile (malformed, or uses a keyword it does not implement)."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of ``schema`` (``None``: any JSON object); ``GrammarError`` if it is not usable."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT if schema is None else schema,
                                                     overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(problem)
    return grammar


class _Tokens:
    """llguidance's tokenizer interface over a ``Vocabulary`` (special tokens carry llguidance's marker)."""

    def __init__(self, vocab: Vocabulary, eos: Sequence[int]) -> None:
        self.eos_token_id, self.bos_token_id = eos[0], None
        self.tokens = [SPECIAL_MARKER + t if i in vocab.special else t for i, t in enumerate(vocab.tokens)]
        self.special_token_ids = sorted(vocab.special)
        self._encode = vocab.encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text if isinstance(text, str) else text.decode("utf-8", errors="replace"))


@functools.lru_cache(maxsize=8)
def _lltokenizer(vocab: Vocabulary, eos: tuple[int, ...]) -> Any:
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_Tokens(vocab, eos)), eos_token=list(eos))


@functools.cache
def _executor() -> Any:
    from llguidance import LLExecutor

    return LLExecutor(num_threads=2)


class GrammarConstraint:
    """One row's grammar state: which tokens may come next, and the tokens it has taken."""

    def __init__(self, grammar: str, vocab: Vocabulary, stop_ids: Sequence[int]) -> None:
        from llguidance import LLMatcher

        if not stop_ids:
            raise QwenVLError("a grammar needs the row's stop token ids (its end of text)")
        self.vocab_size = len(vocab)
        self.matcher = LLMatcher(_lltokenizer(vocab, tuple(sorted(set(stop_ids)))), grammar, log_level=0)
        self._check()

    def consume(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed)."""
        self.matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise QwenVLError(f"the output grammar failed: {self.matcher.get_error()}")


def allowed_tokens(constraints: Sequence[GrammarConstraint], vocab_size: int, device: torch.device
                   ) -> torch.Tensor:
    """``[len(constraints), vocab_size]`` bool on ``device``: the tokens each row's grammar allows next (ids beyond
    the tokenizer's vocabulary, the model's padded rows, never)."""
    if len({c.vocab_size for c in constraints}) > 1:
        raise QwenVLError("rows constrained over different vocabularies in one batch")
    known = constraints[0].vocab_size
    words = (known + 31) // 32
    bitmask = np.zeros((len(constraints), words), dtype=np.int32)
    _executor().unsafe_compute_mask_ptr([(c.matcher, k) for k, c in enumerate(constraints)],
                                        bitmask.ctypes.data, words * 4, len(constraints))
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : min(known, vocab_size)]
    allowed = torch.zeros(len(constraints), vocab_size, dtype=torch.bool)
    allowed[:, : bits.shape[1]] = torch.from_numpy(bits.astype(bool))
    return queued_copy(allowed, device)
