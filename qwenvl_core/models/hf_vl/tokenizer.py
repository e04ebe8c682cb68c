"""The tiny tokenizer of the transformers-native Qwen VL families, written in the official file layout.

A byte-level BPE trained here, deterministically, with the ``tokenizers`` library on the built-in corpus of
``qwen_vl.tiny_tokenizer`` (plus a few lines of the newer grounding formats), with the official tokenizer's
normalizer (NFC), pre-tokenizer (the Qwen2 split regex, then byte level) and decoder. The family's real special
tokens follow the ordinary tokens in the official order, so with ``n_ordinary`` = 151,643 every special token has
its official id (the ordinary tokens beyond the trained ones are unreachable fillers: only the shapes and the
special ids are meaningful then). Files: ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and
``tokenizer_config.json``, as in the official repositories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwenvl_core.errors import TokenizerError
from qwenvl_core.models.hf_vl.spec import FamilySpec

TINY_ORDINARY_TOKENS = 1024
# Grounding lines in the formats of the newer families, so the tiny vocabulary has merges for them too.
_EXTRA_CORPUS = (
    '{"bbox_2d": [120, 340, 250, 470], "label": "red circle"}',
    '[{"bbox_2d": [600, 100, 850, 350], "label": "blue square"}, {"bbox_2d": [12, 34, 56, 78], "label": "cat"}]',
    "```json\n[\n\t{\"bbox_2d\": [10, 20, 30, 40], \"label\": \"green triangle\"}\n]\n```",
    "(120,340),(250,470) (600,100),(850,350) the red circle the blue square",
)


def _corpus() -> list[str]:
    from qwenvl_core.models.qwen_vl.tiny_tokenizer import tiny_corpus

    return tiny_corpus() + list(_EXTRA_CORPUS)


def _pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_vocab(n_trained: int = TINY_ORDINARY_TOKENS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on the built-in corpus: ``(vocab, merges)`` with exactly ``n_trained`` tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    if len(vocab) != n_trained:
        raise TokenizerError(f"the built-in corpus yields {len(vocab)} tokens, not the {n_trained} asked for")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
    return vocab, merges


def build_tokenizer(spec: FamilySpec, n_ordinary: int) -> Any:
    """The complete tokenizer: trained BPE, filler tokens up to ``n_ordinary``, then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if n_ordinary < TINY_ORDINARY_TOKENS:
        raise TokenizerError(f"a tokenizer needs at least {TINY_ORDINARY_TOKENS} ordinary tokens, got {n_ordinary}")
    vocab, merges = train_vocab()
    # Fillers: "ÿþ" (bytes FF FE) is never merged, so BPE can never produce these; they only occupy ids so that
    # the special tokens land on their official ids.
    for rank in range(len(vocab), n_ordinary):
        vocab[f"ÿþ{rank}"] = rank
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token in spec.special_tokens:  # one at a time: ids follow the official order
        tok.add_tokens([AddedToken(token.content, special=token.special, normalized=False)])
    ids = {token.content: tok.token_to_id(token.content) for token in spec.special_tokens}
    if ids != spec.special_token_ids(n_ordinary):
        raise TokenizerError(f"special token ids {ids} do not follow the {n_ordinary} ordinary tokens")
    return tok


def tokenizer_config(spec: FamilySpec, n_ordinary: int) -> dict:
    """The ``tokenizer_config.json`` of the official repositories (Qwen2Tokenizer, ChatML, <|im_end|> ends)."""
    ids = spec.special_token_ids(n_ordinary)
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[token.content]): {
                "content": token.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token.special,
            }
            for token in spec.special_tokens
        },
        "additional_special_tokens": [t.content for t in spec.special_tokens[1:] if t.special],
        "bos_token": None,
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": spec.model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(spec: FamilySpec, out_dir: str | Path, n_ordinary: int) -> None:
    """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``out_dir``."""
    out = Path(out_dir)
    tok = build_tokenizer(spec, n_ordinary)
    tok.save(str(out / "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(spec, n_ordinary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
