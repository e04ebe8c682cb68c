"""Strict Qwen-VL weights I/O tests: save / load round trips, sharding, .bin, and clear loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl_core.errors import ConfigError, ModelLoadError
from qwenvl_core.models.qwen_vl import QWenLMHeadModel, build_config, load_model, save_model
from qwenvl_core.models.qwen_vl.weights import read_config, read_state_dict

IDS = torch.tensor([[5, 6, 1238] + [1240] * 16 + [1239, 7, 8]])


@pytest.fixture(scope="module")
def tiny() -> QWenLMHeadModel:
    torch.manual_seed(0)
    return QWenLMHeadModel(build_config("qwen-vl-tiny")).eval()


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))


def logits(model: QWenLMHeadModel, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, pixel_values=pixel_values).logits


def write_single(tiny: QWenLMHeadModel, out: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + one model.safetensors holding ``state`` (default: the model's)."""
    out.mkdir(parents=True, exist_ok=True)
    tiny.config.save_pretrained(str(out))
    state = state if state is not None else {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def test_save_load_round_trip_and_hf_from_pretrained(tiny, pixel_values, tmp_path):
    save_model(tiny, tmp_path)
    assert (tmp_path / "config.json").is_file()
    expected = logits(tiny, pixel_values)
    loaded = load_model(tmp_path)
    assert not loaded.training and loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(logits(loaded, pixel_values), expected)
    assert loaded.transformer.rotary_emb.inv_freq.device.type == "cpu"
    assert not loaded.transformer.visual.attn_pool.pos_embed.requires_grad
    hf = QWenLMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(logits(hf, pixel_values), expected)


def test_load_with_dtype(tiny, pixel_values, tmp_path):
    save_model(tiny, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.transformer.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.isfinite(logits(loaded, pixel_values).float()).all()


def test_sharding_writes_an_index(tiny, pixel_values, tmp_path):
    save_model(tiny, tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(tiny.state_dict())
    assert torch.equal(logits(load_model(tmp_path), pixel_values), logits(tiny, pixel_values))


def test_bin_shards_load_with_weights_only(tiny, pixel_values, tmp_path):
    tiny.config.save_pretrained(str(tmp_path))
    state = tiny.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for shard, part in (("pytorch_model-1.bin", keys[:half]), ("pytorch_model-2.bin", keys[half:])):
        torch.save({k: state[k].clone() for k in part}, tmp_path / shard)
        weight_map |= dict.fromkeys(part, shard)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits(load_model(tmp_path), pixel_values), logits(tiny, pixel_values))
    torch.save({"w": torch.zeros(1), "evil": object()}, tmp_path / "pytorch_model-1.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model-1.bin"):
        read_state_dict(tmp_path)


def test_missing_key_is_listed(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    del state["transformer.h.1.mlp.w2.weight"]
    with pytest.raises(ModelLoadError, match=r"1 missing keys: transformer\.h\.1\.mlp\.w2\.weight"):
        load_model(write_single(tiny, tmp_path, state))


def test_extra_key_is_listed(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    state["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)
    with pytest.raises(
        ModelLoadError, match=r"unexpected keys: transformer\.h\.0\.attn\.rotary_emb\.inv_freq"
    ):
        load_model(write_single(tiny, tmp_path, state))


def test_wrong_shape_is_reported(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    state["lm_head.weight"] = torch.zeros(1280, 32)
    with pytest.raises(
        ModelLoadError, match=r"shape mismatches: lm_head\.weight \(1280, 32\) != \(1280, 64\)"
    ):
        load_model(write_single(tiny, tmp_path, state))


def test_long_key_lists_are_truncated(tiny, tmp_path):
    state = {
        k: v.contiguous() for k, v in tiny.state_dict().items() if not k.startswith("transformer.visual")
    }
    with pytest.raises(ModelLoadError, match=r"missing keys: .*and \d+ more"):
        load_model(write_single(tiny, tmp_path, state))


def test_missing_config_and_weights_are_named(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    tiny.config.save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)


def test_corrupt_shard_is_named(tiny, tmp_path):
    save_model(tiny, tmp_path, max_shard_size="300KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(tmp_path)


def test_gptq_checkpoint_is_refused(tiny, tmp_path):
    write_single(tiny, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.h.0.mlp.w1.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="GPTQ Int4.*not supported.*bf16"):
        load_model(tmp_path)


def test_official_config_json_loads_with_extension_defaults(tmp_path):
    official = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
        "attn_dropout_prob": 0.0,
        "bf16": True,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "visual": {
            "heads": 16,
            "image_size": 448,
            "image_start_id": 151857,
            "layers": 48,
            "mlp_ratio": 4.9231,
            "output_dim": 4096,
            "patch_size": 14,
            "width": 1664,
        },
        "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = read_config(tmp_path)
    assert config.visual["n_queries"] == 256 and config.visual["pos_grid_size"] == 16
    assert config.image_pad_id == 151859 and config.use_flash_attn == "auto"
    official["visual"]["patch_size"] = 0
    (tmp_path / "config.json").write_text(json.dumps(official))
    with pytest.raises(ConfigError, match=r"config\.json.*visual\.patch_size"):
        read_config(tmp_path)
