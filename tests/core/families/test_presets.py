"""Presets and configs of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: published sizes, tiny structure, config validation."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from qwenvl_core.errors import ConfigError, PresetError
from qwenvl_core.models.registry import family_for_preset, get_family, parameter_counts
from tests.core.families.conftest import HF_FAMILIES

FULL_SIZE = [
    (family, preset)
    for family in HF_FAMILIES
    for preset, spec in get_family(family).spec.presets.items()
    if spec.published_params is not None
]


def _meta_model(family_name: str, preset: str) -> tuple[object, torch.nn.Module]:
    family = get_family(family_name)
    with torch.device("meta"):
        return family, family.build_model(family.build_config(preset))


def test_the_required_presets_exist():
    presets = {p for f in HF_FAMILIES for p in get_family(f).preset_names()}
    assert {"qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-2b", "qwen3-vl-4b",
            "qwen3-vl-8b", "qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny", "qwen2.5-vl-small"} <= presets
    assert family_for_preset("qwen2.5-vl-7b").name.value == "qwen2.5-vl"
    assert len(FULL_SIZE) == 7


@pytest.mark.parametrize(("family_name", "preset"), FULL_SIZE, ids=[p for _, p in FULL_SIZE])
def test_full_size_parameter_count_matches_the_published_total(family_name, preset):
    family, model = _meta_model(family_name, preset)
    counts = parameter_counts(family, model)
    published = family.spec.presets[preset].published_params
    assert counts["total"] == pytest.approx(published, rel=0.01)
    assert counts["total"] == counts["vision"] + counts["adapter"] + counts["language"]
    assert 0 < counts["adapter"] < counts["vision"] < counts["language"]
    # The language model holds the token embedding once, tied to the LM head or not.
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied


def test_qwen3_vl_2b_components_match_the_published_breakdown():
    # huggingface.co/OpenExplorer/Qwen3-VL-2B-Instruct: ViT 407.0M, LM 1.721B (from the upstream checkpoint).
    family, model = _meta_model("qwen3-vl", "qwen3-vl-2b")
    counts = parameter_counts(family, model)
    assert counts["vision"] + counts["adapter"] == pytest.approx(407.0e6, rel=0.001)
    assert counts["language"] == pytest.approx(1.721e9, rel=0.001)


def test_tied_embeddings_are_counted_once():
    family, model = _meta_model("qwen3-vl", "qwen3-vl-4b")
    state_dict_total = sum(t.numel() for t in model.state_dict().values())
    embedding = model.model.language_model.embed_tokens.weight.numel()
    assert parameter_counts(family, model)["total"] == state_dict_total - embedding


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_tiny_preset_is_tiny_and_keeps_the_real_structure(family_name):
    family, model = _meta_model(family_name, f"{family_name}-tiny")
    config = model.config
    vision = config.vision_config
    assert parameter_counts(family, model)["total"] < 2_000_000
    assert vision.patch_size == (16 if family_name == "qwen3-vl" else 14)
    assert (vision.spatial_merge_size, vision.temporal_patch_size) == (2, 2)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    if family_name == "qwen3-vl":
        assert len(vision.deepstack_visual_indexes) >= 2 and text.rope_parameters["mrope_interleaved"]
        assert any(n.startswith("model.visual.deepstack_merger_list.") for n, _ in model.named_parameters())
    if family_name == "qwen2.5-vl":
        assert vision.fullatt_block_indexes and vision.window_size


def test_qwen2_5_vl_small_is_a_benchmark_size():
    family, model = _meta_model("qwen2.5-vl", "qwen2.5-vl-small")
    assert 30e6 < parameter_counts(family, model)["total"] < 100e6


def test_qwen3_vl_chat_template_is_the_pinned_official_one():
    spec = get_family("qwen3-vl").spec
    from qwenvl_core.models.qwen3_vl.chat_template import QWEN3_VL_CHAT_TEMPLATE_SHA256

    assert hashlib.sha256(spec.chat_template.encode("utf-8")).hexdigest() == QWEN3_VL_CHAT_TEMPLATE_SHA256
    assert spec.chat_template != get_family("qwen2-vl").spec.chat_template
    assert get_family("qwen2.5-vl").spec.chat_template == get_family("qwen2-vl").spec.chat_template


def test_unknown_preset_lists_the_family_presets():
    with pytest.raises(PresetError, match="qwen3-vl-tiny"):
        get_family("qwen3-vl").build_config("qwen3-vl-1b")


def _write_config(tmp_path, family_name, mutate):
    config = copy.deepcopy(dict(get_family(family_name).spec.presets[f"{family_name}-tiny"].config))
    config["model_type"] = get_family(family_name).spec.model_type
    mutate(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("family_name", "mutate", "field"),
    [
        ("qwen2-vl", lambda c: c["rope_scaling"].update(mrope_section=[4, 4, 4]), "mrope_section"),
        ("qwen2-vl", lambda c: c["rope_scaling"].update(mrope_section=["2", 3, 3]), "must be 3 integers"),
        ("qwen2-vl", lambda c: c["vision_config"].update(hidden_size=48), "vision_config.hidden_size"),
        ("qwen2-vl", lambda c: c.update(image_token_id=5000), "image_token_id"),
        ("qwen2-vl", lambda c: c.update(num_attention_heads=5), "hidden_size 64 is not divisible"),
        ("qwen2-vl", lambda c: c.update(hidden_size="wide"), "hidden_size"),
        ("qwen2.5-vl", lambda c: c["vision_config"].update(fullatt_block_indexes=[1, 9]), "fullatt_block_indexes"),
        ("qwen2.5-vl", lambda c: c.update(vision_config=[1, 2]), "vision_config must be a JSON object"),
        ("qwen3-vl", lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 7]), "deepstack_visual_indexes"),
        ("qwen3-vl", lambda c: c["vision_config"].update(out_hidden_size=32), "vision_config.out_hidden_size"),
        ("qwen3-vl", lambda c: c["text_config"]["rope_scaling"].update(mrope_section=[2, 3, 3]), "mrope_interleaved"),
        ("qwen3-vl", lambda c: c["vision_config"].update(num_position_embeddings=60), "num_position_embeddings"),
        ("qwen3-vl", lambda c: c.update(model_type="qwen2_vl"), "model_type 'qwen2_vl' is not 'qwen3_vl'"),
    ],
)
def test_invalid_config_json_is_a_config_error_naming_file_and_field(tmp_path, family_name, mutate, field):
    directory = _write_config(tmp_path, family_name, mutate)
    with pytest.raises(ConfigError) as err:
        get_family(family_name).load_config(directory)
    assert str(directory / "config.json") in str(err.value)
    assert field in str(err.value)


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_the_tiny_preset_config_json_is_valid(tmp_path, family_name):
    config = get_family(family_name).load_config(_write_config(tmp_path, family_name, lambda c: None))
    assert config.model_type == get_family(family_name).spec.model_type


def test_errors_name_the_fields_as_a_transformers_saved_config_json_spells_them(tmp_path, tiny_dirs):
    # transformers 5 saves Qwen2-VL configs nested (text_config.rope_parameters), the hub files are flat.
    config = json.loads((tiny_dirs["qwen2-vl"] / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [1, 1, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"text_config\.rope_parameters\.mrope_section \[1, 1, 1\] must add up"):
        get_family("qwen2-vl").load_config(tmp_path)
