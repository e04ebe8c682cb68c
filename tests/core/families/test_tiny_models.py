"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL directories: deterministic, strict loading, processor, forward."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwenvl_core.errors import ConfigError, ModelLoadError
from qwenvl_core.models.hf_vl.weights import save_model
from qwenvl_core.models.registry import FamilyName, detect_family, get_family
from tests.core.families.conftest import HF_FAMILIES

TEXT = "What colour is the shape?"


def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _image(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _inputs(processor, image: Image.Image, text: str = TEXT) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[prompt], images=[image], return_tensors="pt"))


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    """``{family: (family, model, transformers processor)}`` loaded once from the shared tiny directories."""
    result = {}
    for name, directory in tiny_dirs.items():
        family = get_family(name)
        result[name] = (family, family.load_model(directory), family.load_processor(directory).hf)
    return result


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_materialize_is_deterministic_and_complete(tmp_path, tiny_dirs, family_name):
    family, original = get_family(family_name), tiny_dirs[family_name]
    names = {p.name for p in original.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "chat_template.json", "preprocessor_config.json", "model.safetensors"} <= names
    again = family.materialize(f"{family_name}-tiny", tmp_path / "again", seed=0)
    assert _digests(again) == _digests(original)
    # The official key layout: Qwen2/2.5-VL checkpoints predate transformers' model.visual / model.language_model.
    keys = load_file(str(original / "model.safetensors")).keys()
    prefixes = {".".join(k.split(".")[:2]) for k in keys}
    if family_name == "qwen3-vl":
        assert prefixes == {"model.visual", "model.language_model"}
    else:
        assert {p.split(".")[0] for p in prefixes} == {"visual", "model"} and "model.layers" in prefixes
    assert "lm_head.weight" not in keys  # tied to the embedding in the tiny presets, stored once
    other = _digests(family.materialize(f"{family_name}-tiny", tmp_path / "seed1", seed=1))
    assert other["tokenizer.json"] == _digests(original)["tokenizer.json"]
    assert other["model.safetensors"] != _digests(original)["model.safetensors"]


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_load_model_round_trip_gives_equal_logits(tmp_path, tiny_dirs, loaded, family_name):
    family, model, processor = loaded[family_name]
    inputs = _inputs(processor, _image(0))
    expected = _logits(model, inputs)
    # The same seed through the model class directly: materialize wrote exactly these weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = family.build_model(family.load_config(tiny_dirs[family_name])).eval()
    assert torch.equal(_logits(fresh, inputs), expected)
    # save_model -> load_model (also sharded), and transformers' own loader on what we wrote.
    family.save_model(model, tmp_path / "saved")
    assert torch.equal(_logits(family.load_model(tmp_path / "saved"), inputs), expected)
    save_model(model, tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(family.load_model(tmp_path / "sharded"), inputs), expected)
    official = family.spec.transformers_class("model_class").from_pretrained(
        tiny_dirs[family_name], local_files_only=True, dtype=torch.float32
    ).eval()
    assert torch.equal(_logits(official, inputs), expected)


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_a_small_image_changes_the_forward(loaded, family_name):
    _, model, processor = loaded[family_name]
    first, second = _inputs(processor, _image(1)), _inputs(processor, _image(2))
    grid = first["image_grid_thw"]
    assert int((first["input_ids"] == model.config.image_token_id).sum()) == int(grid.prod()) // 4
    logits = _logits(model, first)
    assert logits.shape == (1, first["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, _logits(model, second))  # the pixels reach the language model


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_tokenizer_special_ids_equal_the_config_ids(tiny_dirs, loaded, family_name):
    _, model, processor = loaded[family_name]
    tok, config = processor.tokenizer, model.config
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                       "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    assert ids["<|vision_start|>"] == config.vision_start_token_id
    assert ids["<|vision_end|>"] == config.vision_end_token_id
    assert ids["<|image_pad|>"] == config.image_token_id == processor.image_token_id
    assert ids["<|video_pad|>"] == config.video_token_id
    assert tok.eos_token_id == ids["<|im_end|>"] == config.text_config.eos_token_id
    assert tok.pad_token_id == ids["<|endoftext|>"]
    generation = json.loads((tiny_dirs[family_name] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert max(tok.get_vocab().values()) < config.text_config.vocab_size
    # Special tokens are single tokens; text around them still tokenizes with the trained BPE.
    encoded = tok("<|im_start|>user\nWhat colour?<|im_end|>", add_special_tokens=False).input_ids
    assert encoded[0] == tok.convert_tokens_to_ids("<|im_start|>") and encoded[-1] == ids["<|im_end|>"]
    assert tok.decode(encoded) == "<|im_start|>user\nWhat colour?<|im_end|>"


def test_the_later_families_carry_their_extra_tokens(loaded):
    tok2 = loaded["qwen2-vl"][2].tokenizer
    tok25 = loaded["qwen2.5-vl"][2].tokenizer
    tok3 = loaded["qwen3-vl"][2].tokenizer
    assert "<tool_call>" not in tok2.get_vocab()
    assert tok25.convert_tokens_to_ids("<tool_call>") == tok25.convert_tokens_to_ids("<|video_pad|>") + 1
    assert tok3.convert_tokens_to_ids("</think>") == tok3.convert_tokens_to_ids("<|video_pad|>") + 12
    assert tok3.decode([tok3.convert_tokens_to_ids("<think>")], skip_special_tokens=True) == "<think>"


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_processor_loads_offline_with_transformers_classes_and_the_official_template(tiny_dirs, loaded,
                                                                                     family_name):
    import transformers

    family, _, processor = loaded[family_name]
    assert isinstance(processor, family.spec.transformers_class("processor_class"))
    assert isinstance(processor.tokenizer, transformers.Qwen2Tokenizer)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    auto_tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs[family_name], local_files_only=True)
    assert auto_tok.chat_template == family.spec.chat_template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    system = "" if family_name == "qwen3-vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert rendered == (f"{system}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{TEXT}<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_auto_processor_needs_torchvision_for_the_video_processor(tiny_dirs):
    """Why load_processor assembles the processor: AutoProcessor also builds the video processor."""
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():  # pragma: no cover - not on the project's CPU machines
        processor = transformers.AutoProcessor.from_pretrained(tiny_dirs["qwen3-vl"], local_files_only=True)
        assert processor.video_processor is not None
    else:
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            transformers.AutoProcessor.from_pretrained(tiny_dirs["qwen3-vl"], local_files_only=True)


def test_detect_family_picks_each_family_and_still_v1(tiny_dirs, tiny_model_dir, tmp_path):
    for name, directory in tiny_dirs.items():
        assert detect_family(directory).name is FamilyName(name)
    assert detect_family(tiny_model_dir).name is FamilyName.QWEN_VL
    # A config.json without model_type is matched by its architectures.
    config = json.loads((tiny_dirs["qwen2.5-vl"] / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert detect_family(tmp_path).name is FamilyName.QWEN2_5_VL
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="qwen3-vl"):
        detect_family(tmp_path)


def _edit_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path, tiny_dirs, family_name):
    family = get_family(family_name)
    directory = shutil.copytree(tiny_dirs[family_name], tmp_path / "copy")
    removed = sorted(k for k in load_file(str(directory / "model.safetensors")) if ".mlp." in k)[0]

    def edit(state: dict) -> None:
        del state[removed]
        state["model.extra_projection.weight"] = torch.zeros(2, 2)

    _edit_weights(directory, edit)
    with pytest.raises(ModelLoadError) as err:
        family.load_model(directory)
    message = str(err.value)
    assert "1 missing keys" in message and removed.split(".mlp.")[-1] in message
    assert "1 unexpected keys" in message and "extra_projection.weight" in message


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_strict_loading_refuses_wrong_shapes_pickles_and_empty_directories(tmp_path, tiny_dirs, family_name):
    family = get_family(family_name)
    shaped = shutil.copytree(tiny_dirs[family_name], tmp_path / "shaped")
    state = load_file(str(shaped / "model.safetensors"))
    key = sorted(k for k in state if k.endswith("norm.weight"))[0]
    width = state[key].shape[0]
    _edit_weights(shaped, lambda s: s.__setitem__(key, torch.ones(width + 1)))
    with pytest.raises(ModelLoadError) as err:
        family.load_model(shaped)
    assert "1 mis-shaped keys: " in str(err.value) and f"({width + 1},) != ({width},)" in str(err.value)

    pickled = shutil.copytree(tiny_dirs[family_name], tmp_path / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only pickled weights .*pytorch_model.bin"):
        family.load_model(pickled)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no weights in"):
        family.load_model(pickled)


@pytest.mark.parametrize("family_name", HF_FAMILIES)
def test_components_and_vision_tower(loaded, family_name):
    family, model, _ = loaded[family_name]
    components = {family.component_of(name) for name, _ in model.named_parameters()}
    assert components == {"vision", "adapter", "language"}
    assert family.component_of("model.visual.merger.mlp.0.weight") == "adapter"
    assert family.component_of("base_model.model.model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert family.component_of("lm_head.weight") == "language"
    tower = family.vision_tower(model)
    assert tower is model.model.visual
    assert all(family.component_of(f"model.visual.{n}") in ("vision", "adapter") for n, _ in tower.named_parameters())
    stops = family.stop_token_ids(loaded[family_name][2])
    assert stops[0] == model.config.text_config.eos_token_id


def test_every_family_implements_the_protocol(loaded):
    from qwenvl_core.models.registry import ModelFamily

    for name, (family, _, _) in loaded.items():
        assert isinstance(family, ModelFamily)
        assert family.name is FamilyName(name) and "q_proj" in family.default_lora_targets


def test_load_processor_of_a_directory_without_tokenizer_names_it(tmp_path, tiny_dirs):
    shutil.copy(tiny_dirs["qwen2-vl"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        get_family("qwen2-vl").load_processor(tmp_path)


def test_full_size_tokenizer_puts_the_special_tokens_on_their_official_ids():
    from qwenvl_core.models.hf_vl.tokenizer import build_tokenizer

    family = get_family("qwen3-vl")
    config = family.build_config("qwen3-vl-8b")
    tok = build_tokenizer(family.spec, 151643)
    assert tok.token_to_id("<|endoftext|>") == 151643 == config.text_config.bos_token_id
    assert tok.token_to_id("<|im_end|>") == config.text_config.eos_token_id == 151645
    assert tok.token_to_id("<|vision_start|>") == config.vision_start_token_id == 151652
    assert tok.token_to_id("<|image_pad|>") == config.image_token_id == 151655
    assert tok.token_to_id("<|video_pad|>") == config.video_token_id == 151656
    assert tok.token_to_id("</think>") == 151668 < config.text_config.vocab_size
    assert max(tok.encode("What colour is the shape? 你好").ids) < 1024  # fillers are never produced
