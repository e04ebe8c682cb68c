"""The family registry and deterministic materialisation of random model directories."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qwenvl_core.errors import ConfigError, ModelLoadError, PresetError
from qwenvl_core.models.qwen_vl.materialize import write_random_model
from qwenvl_core.models.registry import FamilyName, detect_family, family_for_preset, get_family
from tests.devices import DEVICES


def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_materialize_writes_a_complete_directory_deterministically(tmp_path, tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "qwen.tiktoken"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    again = write_random_model(tmp_path / "again", preset="qwen-vl-tiny", seed=0)
    assert _digests(again) == _digests(tiny_model_dir)
    other_seed = write_random_model(tmp_path / "seed1", preset="qwen-vl-tiny", seed=1)
    assert _digests(other_seed)["qwen.tiktoken"] == _digests(tiny_model_dir)["qwen.tiktoken"]
    assert _digests(other_seed) != _digests(tiny_model_dir)


def test_materialized_directory_loads_through_the_family(tiny_model_dir):
    family = detect_family(tiny_model_dir)
    assert family.name is FamilyName.QWEN_VL
    model = family.load_model(tiny_model_dir)
    processor = family.load_processor(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert processor.tokenizer.img_start_id == config["visual"]["image_start_id"]
    assert model.config.vocab_size > processor.tokenizer.img_pad_id
    assert set(family.stop_token_ids(processor)) == {
        processor.tokenizer.im_end_id, processor.tokenizer.im_start_id, processor.tokenizer.eod_id
    }


def test_materialize_refuses_a_non_empty_directory_and_leaves_it_intact(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        write_random_model(target, preset="qwen-vl-tiny")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging directory left behind


def test_unknown_preset_and_family_errors_list_the_choices():
    with pytest.raises(PresetError, match="qwen-vl-tiny"):
        family_for_preset("qwen-vl-huge")
    with pytest.raises(ConfigError, match="qwen-vl"):
        get_family("llava")


def test_detect_family_errors_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        detect_family(tmp_path)


def test_component_split():
    family = get_family("qwen-vl")
    assert family.component_of("transformer.visual.transformer.resblocks.0.attn.in_proj.weight") == "vision"
    assert family.component_of("transformer.visual.conv1.weight") == "vision"
    assert family.component_of("transformer.visual.attn_pool.query") == "adapter"
    assert family.component_of("transformer.visual.ln_post.weight") == "adapter"
    assert family.component_of("transformer.visual.proj") == "adapter"
    assert family.component_of("transformer.h.0.attn.c_attn.weight") == "language"
    assert family.component_of("lm_head.weight") == "language"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["qwen-vl-tiny", "qwen2.5-vl-tiny"])
def test_materialize_draws_on_the_given_device_deterministically_and_leaves_the_callers_random_state(
        tmp_path, device, preset):
    family = family_for_preset(preset)
    cpu_state = torch.random.get_rng_state()
    first = family.materialize(preset, tmp_path / "first", seed=0, device=device)
    assert torch.equal(torch.random.get_rng_state(), cpu_state)
    again = family.materialize(preset, tmp_path / "again", seed=0, device=device)
    assert _digests(first) == _digests(again)
    if device == "cpu":  # the default device: the same files as a directory written without naming one
        assert _digests(first) == _digests(family.materialize(preset, tmp_path / "default", seed=0))
    model = family.load_model(first, device=device)  # strict: every weight present with its shape
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
