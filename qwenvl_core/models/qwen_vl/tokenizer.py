"""QWenTokenizer: the Qwen-VL v1 tokenizer on tiktoken, reading an official-format ``qwen.tiktoken`` file.

This module owns the vocabulary file format (lines ``base64(token_bytes) rank``), the pre-tokenizer regex, the
special tokens and their ids (appended after the N mergeable ranks in the official order, see
``docs/architecture.md``), NFC normalisation, and encode / decode. It knows nothing about images beyond the
ids of the image span: pixels never travel inside token ids (``image_span`` gives the placeholder run that the
model fills with image features).
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from collections.abc import Iterable, Set
from pathlib import Path
from typing import Literal

import tiktoken

from qwenvl_core.errors import TokenizerError

TIKTOKEN_FILENAME = "qwen.tiktoken"

# The official pre-tokenizer regex (tokenization_qwen.py).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
N_EXTRAS = 205

# Enumeration order = id order (official SPECIAL_TOKENS tuple).
SPECIAL_TOKENS: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(N_EXTRAS))
    + (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
)
N_SPECIAL = len(SPECIAL_TOKENS)  # 217

# The only special surface forms that message text may produce: the official ``make_context`` encodes roles and
# contents with ``allowed_special=set(tokenizer.IMAGE_ST)`` (grounding and image tags). Everything else, above
# all ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>``, is plain text there, so a message cannot open a turn.
CONTENT_SPECIALS: frozenset[str] = frozenset(
    (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
)


def special_token_ids(n_ranks: int) -> dict[str, int]:
    """The special tokens and their ids for a vocabulary of ``n_ranks`` mergeable ranks."""
    return {token: n_ranks + i for i, token in enumerate(SPECIAL_TOKENS)}


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """Parse a ``qwen.tiktoken`` file into ``{token_bytes: rank}``, checking ranks are 0..N-1."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {path} not found (if the model was cloned from a hub, it may have been cloned "
            "without git-lfs: run `git lfs install && git lfs pull`)"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"tokenizer file {path} cannot be read as ASCII text: {exc}") from exc
    if text.startswith("version https://git-lfs"):
        raise TokenizerError(f"tokenizer file {path} is a git-lfs pointer, not the file: run `git lfs pull`")
    ranks = _parse_lines(text.splitlines(), path)
    _check_ranks(ranks, path)
    return ranks


def _parse_lines(lines: Iterable[str], path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise TokenizerError(f"{path}, line {lineno}: expected 'base64_token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TokenizerError(f"{path}, line {lineno}: invalid base64 token {fields[0][:40]!r}") from exc
        if not token or token in ranks:
            what = "empty" if not token else "duplicate"
            raise TokenizerError(f"{path}, line {lineno}: {what} token {fields[0][:40]!r}")
        ranks[token] = int(fields[1])
    return ranks


def _check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    if not ranks:
        raise TokenizerError(f"tokenizer file {path} contains no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"tokenizer file {path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"tokenizer file {path}: the {len(missing)} single bytes {missing[:8]}... have no rank "
            "(every byte must be a token for byte-level BPE)"
        )


class QWenTokenizer:
    """Byte-level BPE tokenizer (tiktoken) with the Qwen-VL special tokens after the mergeable ranks."""

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "qwen") -> None:
        self._n_ranks = len(mergeable_ranks)
        self._special = special_token_ids(self._n_ranks)
        self._special_by_id = {i: t for t, i in self._special.items()}
        self._enc = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self._special
        )

    @classmethod
    def from_file(cls, path: str | Path) -> QWenTokenizer:
        """Load a ``qwen.tiktoken`` file."""
        return cls(read_tiktoken_file(path), name=str(path))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> QWenTokenizer:
        """Load ``model_dir/qwen.tiktoken``."""
        return cls.from_file(Path(model_dir) / TIKTOKEN_FILENAME)

    # -- sizes and ids -------------------------------------------------------------------------------------

    @property
    def n_ranks(self) -> int:
        """Number of mergeable (ordinary) tokens; ids 0..n_ranks-1."""
        return self._n_ranks

    @property
    def vocab_size(self) -> int:
        """Number of real tokens: ranks plus the 217 specials (the model's embedding may be larger)."""
        return self._n_ranks + N_SPECIAL

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """A copy of ``{special surface form: id}``."""
        return dict(self._special)

    def special_id(self, token: str) -> int:
        """The id of a special token given by its surface form (``"<img>"``, ``"<|im_end|>"``...)."""
        try:
            return self._special[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not a special token of this tokenizer") from None

    def is_special(self, token_id: int) -> bool:
        """True for the ids of special tokens."""
        return token_id in self._special_by_id

    @property
    def eod_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special[IM_END]

    @property
    def ref_start_id(self) -> int:
        return self._special[REF_START]

    @property
    def ref_end_id(self) -> int:
        return self._special[REF_END]

    @property
    def box_start_id(self) -> int:
        return self._special[BOX_START]

    @property
    def box_end_id(self) -> int:
        return self._special[BOX_END]

    @property
    def quad_start_id(self) -> int:
        return self._special[QUAD_START]

    @property
    def quad_end_id(self) -> int:
        return self._special[QUAD_END]

    @property
    def img_start_id(self) -> int:
        return self._special[IMG_START]

    @property
    def img_end_id(self) -> int:
        return self._special[IMG_END]

    @property
    def img_pad_id(self) -> int:
        return self._special[IMG_PAD]

    @property
    def image_token_ids(self) -> tuple[int, int, int]:
        """``<img>``, ``</img>``, ``<imgpad>``: the image-span structure, which generation must never emit."""
        return self.img_start_id, self.img_end_id, self.img_pad_id

    def image_span(self, n_queries: int) -> list[int]:
        """The ids of one image: ``<img>`` + ``n_queries`` x ``<imgpad>`` + ``</img>``."""
        if n_queries < 1:
            raise TokenizerError(f"n_queries must be >= 1, got {n_queries}")
        return [self.img_start_id] + [self.img_pad_id] * n_queries + [self.img_end_id]

    # -- encode / decode -----------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: Literal["all"] | Set[str] = "all") -> list[int]:
        """Encode NFC-normalised ``text``; surface forms in ``allowed_special`` become special ids.

        The default ``"all"`` is the official tokenizer's behaviour (fine for trusted text); message text is
        encoded with ``CONTENT_SPECIALS`` (``encode_content``). Special surface forms that are not allowed are
        encoded as ordinary text.
        """
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_content(self, text: str) -> list[int]:
        """Encode message text as the official ``make_context`` does: only ``CONTENT_SPECIALS`` become special
        ids (grounding tags stay markup); ``<|im_start|>`` and every other special surface form stay plain text."""
        return self.encode(text, allowed_special=CONTENT_SPECIALS)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode NFC-normalised ``text`` treating every special surface form as plain text."""
        return self._enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text (invalid UTF-8 becomes U+FFFD).

        With ``skip_special_tokens`` special ids and ids outside the vocabulary (the model's padded
        embedding rows) are dropped; without it, an id outside the vocabulary is a ``TokenizerError``.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if 0 <= i < self._n_ranks]
        else:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise TokenizerError(
                    f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})"
                )
        return self._enc.decode(ids, errors="replace")

    def decode_answer(self, ids: Iterable[int]) -> str:
        """Generated ids as the text a user sees: ordinary tokens plus the grounding markup (``<ref>``, ``<box>``,
        ``<quad>`` and their ends); every other special id and ids outside the vocabulary are dropped."""
        markup = range(self.ref_start_id, self.quad_end_id + 1)
        kept = [i for i in map(int, ids) if 0 <= i < self._n_ranks or i in markup]
        return self._enc.decode(kept, errors="replace")

    def decode_token(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its surface form)."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode()
        if not 0 <= token_id < self._n_ranks:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._enc.decode_single_token_bytes(token_id)
