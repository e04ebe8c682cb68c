"""``quiet_peft``: wrapping a model with LoRA (training) and loading an adapter onto a base (merging) log no
deprecation warning about peft's own reads of transformers attributes; any other warning inside still shows."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from qwenvl_core.models.merge import merged_model
from qwenvl_core.models.peft_warnings import quiet_peft
from qwenvl_core.models.registry import get_family
from qwenvl_core.specs import LoraSpec
from qwenvl_core.training.lora import apply_lora

DEPRECATION = "is_gradient_checkpointing"


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record]


@pytest.mark.parametrize("family_name", ["qwen-vl", "qwen2.5-vl"])
def test_lora_and_merge_log_no_peft_deprecation(family_name: str, tiny_model_dir: Path, tiny_dirs: dict[str, Path],
                                                 tmp_path: Path) -> None:
    family = get_family(family_name)
    base_dir = tiny_model_dir if family_name == "qwen-vl" else tiny_dirs[family_name]
    with warnings.catch_warnings(record=True) as bare:  # what peft does without the shim: the warning is there
        warnings.simplefilter("always")
        get_peft_model(family.load_model(base_dir),
                       LoraConfig(r=2, target_modules=list(family.lora_target_preset("attention"))))
    assert any(DEPRECATION in m for m in _messages(bare)), _messages(bare)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_lora(family.load_model(base_dir), family, LoraSpec(r=2, alpha=4)).save_pretrained(str(tmp_path / "a"))
        merged_model(base_dir, tmp_path / "a", family)
    assert not [m for m in _messages(record) if DEPRECATION in m]


def test_other_warnings_still_show() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with quiet_peft():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning,
                          stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("`is_gradient_checkpointing` is deprecated, as a UserWarning", UserWarning, stacklevel=1)
    assert _messages(record) == ["something else is deprecated",
                                 "`is_gradient_checkpointing` is deprecated, as a UserWarning"]
