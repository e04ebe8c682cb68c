"""Write a complete random model directory of a transformers-native Qwen VL family, deterministically.

The directory has what an official checkpoint has: ``config.json``, ``generation_config.json``, safetensors
weights in the official key layout, the tokenizer files, ``chat_template.json`` and the processor configs; it
loads through the same strict loader. The same preset and seed give byte-identical files. The directory appears
complete or not at all (written to a temporary sibling, then renamed); a non-empty target is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenvl_core.errors import ConfigError
from qwenvl_core.models.dtypes import seeded_init
from qwenvl_core.models.hf_vl.config import build_config
from qwenvl_core.models.hf_vl.files import write_processor_files
from qwenvl_core.models.hf_vl.spec import VISION_START_OFFSET, FamilySpec
from qwenvl_core.models.hf_vl.tokenizer import TINY_ORDINARY_TOKENS, write_tokenizer
from qwenvl_core.models.hf_vl.weights import save_model
from qwenvl_core.models.staging import staged_directory


def ordinary_tokens(config: object) -> int:
    """The number of ordinary tokens implied by the config's ``vision_start_token_id``."""
    n_ordinary = config.vision_start_token_id - VISION_START_OFFSET
    if n_ordinary < TINY_ORDINARY_TOKENS:
        raise ConfigError(
            f"vision_start_token_id {config.vision_start_token_id} implies {n_ordinary} ordinary tokens; at least "
            f"{TINY_ORDINARY_TOKENS} are needed (vision_start_token_id >= {TINY_ORDINARY_TOKENS + VISION_START_OFFSET})"
        )
    return n_ordinary


def write_random_model(
    spec: FamilySpec, preset: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a complete ``preset`` directory with random weights drawn from ``seed`` on ``device`` (``seeded_init``)
    into ``out_dir``."""
    out = Path(out_dir)
    config = build_config(spec, preset)
    n_ordinary = ordinary_tokens(config)
    ids = spec.special_token_ids(n_ordinary)
    with staged_directory(out) as staging:
        write_tokenizer(spec, staging, n_ordinary)
        write_processor_files(spec, spec.presets[preset], staging)
        with seeded_init(seed, dtype, device):
            model = spec.transformers_class("model_class")(config).to(dtype)
        generation = model.generation_config
        generation.bos_token_id = ids["<|endoftext|>"]
        generation.pad_token_id = ids["<|endoftext|>"]
        generation.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.config.dtype = dtype
        save_model(model.cpu(), staging)
        if (training := spec.presets[preset].training) is not None:
            training.write(staging)  # what `auto` hyperparameters read (qwenvl_core.autotune)
    return out
