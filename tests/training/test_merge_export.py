"""Merged export (``qwenvl_core.models.merge``) for every family: an adapter with LM LoRA, vision-tower LoRA and a
trained merger (``modules_to_save``) folded into the base gives a model directory in the base's own layout whose
logits equal the unmerged adapter's; a Q-LoRA adapter is merged onto the unquantised base."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.models.merge import MergeError, main, merge_adapter
from qwenvl_core.models.registry import detect_family, get_family
from qwenvl_core.specs import LoraSpec, Quantization
from qwenvl_core.training.lora import apply_lora, quantize_language_model

FAMILIES = ["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module")
def base_dirs(tiny_model_dir: Path, tiny_dirs: dict[str, Path]) -> dict[str, Path]:
    """Every family's tiny base (the session's shared, read-only directories)."""
    return {"qwen-vl": tiny_model_dir, **tiny_dirs}


def _inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """One chat with an image through the family's own processor, as the model's forward takes it."""
    processor = get_family(detect_family(model_dir).name).load_processor(model_dir)
    message = Message(role="user", parts=[ImagePart(Image.new("RGB", (56, 84), (200, 30, 10))),
                                          TextPart("What colour is the shape?")])
    encoded = processor.encode_chat([message])
    assert encoded.vision is not None
    return {"input_ids": torch.tensor([encoded.input_ids]), **encoded.vision.as_kwargs()}


def _write_adapter(base_dir: Path, out: Path, *, quantization: Quantization = Quantization.NONE, seed: int = 0
                   ) -> Path:
    """A PEFT adapter with LM LoRA, vision LoRA and the trained merger, all of them away from their initial
    (identity) values, saved as training saves it."""
    family = detect_family(base_dir)
    model = family.load_model(base_dir)
    if quantization is Quantization.NF4:
        quantize_language_model(model, family, torch.float32)
    peft_model = apply_lora(model, family, LoraSpec(r=4, alpha=8, vision_lora=True, train_adapter=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in peft_model.named_parameters():
            if param.requires_grad:  # lora_A / lora_B and the modules_to_save copies
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(out))
    return out


def _load(model_dir: Path) -> torch.nn.Module:
    """A model directory's model as training and serving call it (the family's forward contract)."""
    family = detect_family(model_dir)
    return family.forward_contract(family.load_model(model_dir))


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_model_gives_the_adapters_logits_in_the_official_layout(name, base_dirs, tmp_path):
    base_dir = base_dirs[name]
    adapter = _write_adapter(base_dir, tmp_path / "adapter")
    family = detect_family(base_dir)
    inputs = _inputs(base_dir)
    unmerged = _logits(PeftModel.from_pretrained(_load(base_dir), str(adapter)), inputs)
    base = _logits(_load(base_dir), inputs)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter changes the model

    out = merge_adapter(base_dir, adapter, tmp_path / "merged")
    merged_family = detect_family(out)
    assert merged_family.name == family.name
    torch.testing.assert_close(_logits(_load(out), inputs), unmerged, atol=1e-5, rtol=1e-5)
    # the merged directory's processor is the base's: same ids and pixels for the same chat
    for key, value in _inputs(out).items():
        assert torch.equal(value, inputs[key]), key
    # the base's layout: the same tensor names, shapes and dtypes, vision tower and merger changed too
    before, after = _tensors(base_dir), _tensors(out)
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    base_state, merged_state = family.load_model(base_dir).state_dict(), family.load_model(out).state_dict()
    changed = {family.component_of(k) for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed == {"language", "vision", "adapter"}
    assert not any(p.name.startswith(("adapter_", ".")) for p in out.iterdir())
    assert {p.name for p in base_dir.iterdir()} <= {p.name for p in out.iterdir()}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_a_qlora_adapter_is_merged_onto_the_unquantised_base(base_dirs, tmp_path):
    base_dir = base_dirs["qwen2-vl"]
    adapter = _write_adapter(base_dir, tmp_path / "adapter", quantization=Quantization.NF4, seed=1)
    family = detect_family(base_dir)
    inputs = _inputs(base_dir)
    full_precision = _logits(PeftModel.from_pretrained(_load(base_dir), str(adapter)), inputs)
    out = merge_adapter(base_dir, adapter, tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in family.load_model(out).parameters())
    torch.testing.assert_close(_logits(_load(out), inputs), full_precision, atol=1e-5, rtol=1e-5)


def test_the_worker_packs_the_merged_model_and_refuses_a_mismatched_adapter(base_dirs, tmp_path, capsys):
    adapter = _write_adapter(base_dirs["qwen-vl"], tmp_path / "adapter")
    archive = tmp_path / "merged.tar"
    assert main(["--base", str(base_dirs["qwen-vl"]), "--adapter", str(adapter), "--archive", str(archive)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"archive": str(archive), "bytes": archive.stat().st_size, "family": "qwen-vl"}
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked" / "model"
    inputs = _inputs(base_dirs["qwen-vl"])
    expected = _logits(PeftModel.from_pretrained(_load(base_dirs["qwen-vl"]), str(adapter)), inputs)
    torch.testing.assert_close(_logits(_load(unpacked), inputs), expected,
                               atol=1e-5, rtol=1e-5)

    # a v1 adapter onto a Qwen2-VL base: a user-facing error naming both, exit 2, no archive
    other = tmp_path / "other.tar"
    assert main(["--base", str(base_dirs["qwen2-vl"]), "--adapter", str(adapter), "--archive", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and str(base_dirs["qwen2-vl"]) in err and not other.exists()
    # a partial adapter (a weight missing from its file: peft only warns) is refused, not half merged
    partial = tmp_path / "partial"
    shutil.copytree(adapter, partial)
    weights = load_file(partial / "adapter_model.safetensors")
    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, partial / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=f"1 adapter weights missing \\({dropped}\\)"):
        merge_adapter(base_dirs["qwen-vl"], partial, tmp_path / "partial-out")
    with pytest.raises(MergeError, match="no adapter_config.json"):
        merge_adapter(base_dirs["qwen-vl"], tmp_path, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not (tmp_path / "partial-out").exists()
