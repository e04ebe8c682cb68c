"""The ``auto`` hyperparameter rule (``qwenvl_core.autotune``) as a pure function, table-driven, and where a base
model's training defaults come from (its ``training_defaults.json``, its family, the platform)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qwenvl_core import autotune
from qwenvl_core.autotune import (
    LLAMA_FACTORY_LORA,
    PLATFORM_DEFAULTS,
    RANDOM_TINY,
    V1_OFFICIAL,
    Caps,
    DataStats,
    Requested,
    resolve,
    resolve_lora,
)
from qwenvl_core.errors import ConfigError


def _text_only(samples: int) -> DataStats:
    """Upload statistics (no tokenizer) of one-turn text samples: 2 turns x 64 tokens each."""
    return DataStats.from_report({"samples": samples, "turns": 2 * samples, "images": 0}, tokens_per_image=18)


@pytest.mark.parametrize(("defaults", "req", "data", "caps", "expected"), [
    # the demo: 600 one-image samples on 2 workers, the random tiny model -> its measured recipe (999 steps)
    (RANDOM_TINY, Requested(workers=2), DataStats.from_report({"samples": 600, "turns": 1200, "images": 600}, 18),
     Caps(), {"n_epochs": 27, "batch_size": 8, "micro_batch_size": 8, "learning_rate_multiplier": 1000.0}),
    # a small file: the batch shrinks to keep 10 steps per epoch, the steps floor hits the 50-epoch bound, and the
    # learning rate follows the batch down (sqrt(4 / 16) x 1e-2)
    (RANDOM_TINY, Requested(), _text_only(50), Caps(),
     {"n_epochs": 50, "batch_size": 4, "micro_batch_size": 4, "learning_rate_multiplier": 500.0}),
    # v1's official recipe: 5 epochs, lr 1e-5 at batch 8; 700-token samples: 2 per forward pass of 2,048 tokens
    (V1_OFFICIAL, Requested(), DataStats(600, 700, True), Caps(),
     {"n_epochs": 5, "batch_size": 8, "micro_batch_size": 2, "learning_rate_multiplier": 1.0}),
    # OpenAI's floor: 10 samples x 5 epochs < 100 seen -> 100 // 10 epochs; batch 1 -> lr x sqrt(1 / 8)
    (V1_OFFICIAL, Requested(), _text_only(10), Caps(),
     {"n_epochs": 10, "batch_size": 1, "micro_batch_size": 1, "learning_rate_multiplier": 0.3536}),
    # OpenAI's ceiling: 20,000 samples x 3 > 25,000 seen -> 1 epoch; LLaMA-Factory's lr 1e-4 = 10 x 1e-5
    (LLAMA_FACTORY_LORA, Requested(), _text_only(20_000), Caps(),
     {"n_epochs": 1, "batch_size": 8, "micro_batch_size": 8, "learning_rate_multiplier": 10.0}),
    # the tenant's caps bound what auto asks for
    (RANDOM_TINY, Requested(workers=2), _text_only(600), Caps(max_epochs=10, max_micro_batch_size=2),
     {"n_epochs": 10, "batch_size": 8, "micro_batch_size": 2, "learning_rate_multiplier": 1000.0}),
    # no statistics (a file stored without a report): the base model's batch and epochs, one sample per pass
    (RANDOM_TINY, Requested(), None, Caps(),
     {"n_epochs": 3, "batch_size": 8, "micro_batch_size": 1, "learning_rate_multiplier": 707.1}),
    # explicit values win; the auto ones follow them (batch 6 -> micro: its largest divisor that fits, 3)
    (RANDOM_TINY, Requested(n_epochs=2, batch_size=6, learning_rate_multiplier=3.0), DataStats(100, 1000, True),
     Caps(), {"n_epochs": 2, "batch_size": 6, "micro_batch_size": 3, "learning_rate_multiplier": 3.0}),
    # an explicit micro-batch makes the auto batch a multiple of it (8 -> 6): 100 steps per epoch, 10 epochs
    (RANDOM_TINY, Requested(micro_batch_size=3), _text_only(600), Caps(),
     {"n_epochs": 10, "batch_size": 6, "micro_batch_size": 3, "learning_rate_multiplier": 612.4}),
])
def test_the_rule(defaults, req, data, caps, expected) -> None:
    assert resolve(req, defaults, data, caps).values == expected


def test_reasons_cover_exactly_the_auto_values_and_say_why() -> None:
    res = resolve(Requested(n_epochs=2, workers=2), RANDOM_TINY,
                  DataStats.from_report({"samples": 600, "turns": 1200, "images": 600}, 18))
    assert set(res.reasons) == {"batch_size", "micro_batch_size", "learning_rate_multiplier"}
    message = res.message()
    assert message.startswith("auto: batch_size 8 (the base model's 8)")
    assert "learning_rate_multiplier 1000 (learning rate 0.01: the base model's 0.01 at batch 16" in message
    steps = resolve(Requested(workers=2), RANDOM_TINY, _text_only(600)).reasons["n_epochs"]
    assert steps == "600 samples, 37 steps per epoch: the base model needs about 1000 steps"
    capped = resolve(Requested(), RANDOM_TINY, _text_only(600), Caps(max_epochs=4)).reasons["n_epochs"]
    assert capped.endswith("capped at 4")


@pytest.mark.parametrize(("given", "caps", "expected"), [
    ({}, Caps(), {"r": 16, "alpha": 32.0, "dropout": 0.0, "targets": "all-linear"}),
    ({"r": "auto", "alpha": 8.0}, Caps(), {"r": 16, "alpha": 8.0, "dropout": 0.0, "targets": "all-linear"}),
    ({"r": 64, "targets": "attention"}, Caps(), {"r": 64, "alpha": 128.0, "dropout": 0.0, "targets": "attention"}),
    ({}, Caps(max_lora_rank=8), {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear"}),
    ({"freeze_language_model": True, "train_adapter": True}, Caps(),
     {"r": 16, "alpha": 32.0, "dropout": 0.0, "freeze_language_model": True, "train_adapter": True}),
])
def test_lora_fields_left_unset_come_from_the_base_model(given, caps, expected) -> None:
    assert resolve_lora(given, RANDOM_TINY, caps)[0] == expected


def test_upload_statistics_are_estimated_and_tokenized_ones_used() -> None:
    assert DataStats.from_report(None, 18) is None
    assert DataStats.from_report({"samples": 0}, 18) is None
    assert DataStats.from_report({"samples": 10, "turns": 20, "images": 10}, 18) == DataStats(10, 146, False)
    assert DataStats.from_report({"samples": 10, "turns": 20, "images": 10, "max_length": 300}, 18) == DataStats(
        10, 300, True)


def test_defaults_come_from_the_directory_then_the_family_then_the_platform(tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    assert autotune.base_defaults(tiny_model_dir) == (RANDOM_TINY, "training_defaults.json")  # written by materialize
    official = tmp_path / "qwen2.5-vl-7b"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert autotune.base_defaults(official)[0] == LLAMA_FACTORY_LORA
    assert autotune.base_defaults(tmp_path / "s3-or-hub-id")[0] == PLATFORM_DEFAULTS == V1_OFFICIAL
    (official / "training_defaults.json").write_text(json.dumps({"learning_rate": "fast"}))
    with pytest.raises(ConfigError, match="training_defaults.json: learning_rate"):
        autotune.base_defaults(official)


def test_image_tokens_from_the_model_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert autotune.image_tokens(tiny_model_dir) == 16 + 2  # v1: the adapter's queries + <img> </img>
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (hf / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 200704,
                                                             "patch_size": 14, "merge_size": 2}))
    assert autotune.image_tokens(hf) == 200704 // 784 + 2
    assert autotune.image_tokens(hf, max_pixels=50176) == 50176 // 784 + 2  # the job's max_pixels


def test_the_module_stays_torch_free() -> None:
    import subprocess

    code = ("import sys, qwenvl_core.autotune as a; a.image_tokens('/nonexistent'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
