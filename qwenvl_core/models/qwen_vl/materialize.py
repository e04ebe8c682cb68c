"""Write a complete Qwen-VL model directory with random weights, deterministically from a seed.

Tests, the demo and GPU benchmarks load these directories through the same strict loader as an official
checkpoint: ``config.json``, ``qwen.tiktoken`` and sharded safetensors weights. The same preset and seed give
byte-identical files.

The tokenizer is the tiny BPE trained locally (``tiny_tokenizer``). Presets with the official vocabulary
(151,643 ranks) get that tiny BPE padded with unreachable filler ranks up to 151,643, so every special token
has its official id; the text vocabulary is of course not the official one (only the weights' shapes and the
special ids are meaningful in such a directory).
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch

from qwenvl_core.errors import ConfigError
from qwenvl_core.models.dtypes import seeded_init
from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel
from qwenvl_core.models.qwen_vl.presets import build_config, training_defaults
from qwenvl_core.models.qwen_vl.tiny_tokenizer import train_tiny_tokenizer
from qwenvl_core.models.qwen_vl.tokenizer import special_token_ids
from qwenvl_core.models.qwen_vl.weights import save_model
from qwenvl_core.models.staging import staged_directory

TOKENIZER_FILE = "qwen.tiktoken"
TINY_TOKENIZER_RANKS = 1024
# <img> is the 215th special token: its id is the number of ordinary ranks + 214.
_IMG_OFFSET = special_token_ids(0)["<img>"]


def tokenizer_ranks_for(image_start_id: int) -> int:
    """The number of ordinary tokenizer ranks implied by a config's ``visual.image_start_id``."""
    n_ranks = image_start_id - _IMG_OFFSET
    if n_ranks < TINY_TOKENIZER_RANKS:
        raise ConfigError(
            f"visual.image_start_id {image_start_id} implies {n_ranks} tokenizer ranks; "
            f"at least {TINY_TOKENIZER_RANKS} are needed (image_start_id >= {TINY_TOKENIZER_RANKS + _IMG_OFFSET})"
        )
    return n_ranks


def write_tokenizer(path: Path, n_ranks: int) -> None:
    """Write a ``qwen.tiktoken`` with exactly ``n_ranks`` ranks (tiny BPE, padded if more are needed)."""
    train_tiny_tokenizer(path, n_ranks=TINY_TOKENIZER_RANKS)
    if n_ranks == TINY_TOKENIZER_RANKS:
        return
    # Filler tokens all start with 0xFF 0xFE, a pair that is never ranked, so BPE can never build them:
    # they only occupy ids so that the special tokens land on their official ids.
    with path.open("a", encoding="ascii") as out:
        for rank in range(TINY_TOKENIZER_RANKS, n_ranks):
            token = b"\xff\xfe" + rank.to_bytes(4, "big")
            out.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def write_random_model(
    out_dir: str | Path, *, preset: str = "qwen-vl-tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write ``config.json``, ``qwen.tiktoken`` and random safetensors weights for ``preset`` into ``out_dir``,
    the weights drawn on ``device`` (``seeded_init``: a GPU for the full-size presets).

    The directory appears complete or not at all: everything is written to a temporary sibling first and
    renamed into place. An existing non-empty ``out_dir`` is an error (nothing is overwritten).
    """
    out = Path(out_dir)
    config = build_config(preset)
    n_ranks = tokenizer_ranks_for(config.visual["image_start_id"])
    with staged_directory(out) as staging:
        write_tokenizer(staging / TOKENIZER_FILE, n_ranks)
        with seeded_init(seed, dtype, device):
            model = QWenLMHeadModel(config).to(dtype)
        save_model(model.cpu(), staging)
        if (training := training_defaults(preset)) is not None:
            training.write(staging)  # what `auto` hyperparameters read (qwenvl_core.autotune)
    return out
