"""Training Qwen2-VL, Qwen2.5-VL and Qwen3-VL with the platform's trainer: the forward contract against transformers'
own loss / token types / positions, LoRA targets and freeze switches per family, the real loop (learns, adapter
round trip, exact resume, Q-LoRA), evaluation's grounding in pixels, and what is refused (packing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from qwenvl_core.data import Collator, SynthResult, read_samples, write_synth_dataset
from qwenvl_core.errors import ConfigError, QwenVLError
from qwenvl_core.grounding import PixelObject, codec_for
from qwenvl_core.models.hf_vl.forward import token_types
from qwenvl_core.models.hf_vl.processor import load_hf_processor
from qwenvl_core.models.registry import get_family
from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec, JobState, LoraSpec, TargetPreset
from qwenvl_core.training import Hooks, RecordingSink, RunDirEvents, Trainer
from qwenvl_core.training.evaluate import iou, score_answers, task_items
from qwenvl_core.training.hooks import LocalCheckpoints
from qwenvl_core.training.lora import (
    LoraTargetError,
    adapter_modules,
    apply_lora,
    load_base_model,
    resolve_targets,
    vision_targets,
)

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {name: get_family(name).materialize(f"{name}-tiny", root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """24 coloured-shape samples (18 train, 6 validation), v1 dataset markup (boxes rewritten per family)."""
    return write_synth_dataset(tmp_path_factory.mktemp("hf_synth") / "data", n=24, seed=0, val_fraction=0.25,
                               bundles=False)


def _spec(model_dir: Path, data: SynthResult, out: Path, **overrides) -> FineTuneJobSpec:
    fields = {
        "job_id": "hf", "base_model": str(model_dir), "train_file": str(data.train),
        "validation_file": str(data.validation), "output_uri": str(out), "lora": {"r": 8, "alpha": 16},
        "evaluation": {"max_new_tokens": 4, "compare_base": False},
        "hyperparameters": {"max_steps": 8, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                            "warmup_ratio": 0.1},
        "checkpoint": {"every_n_steps": 4},
    }
    for key, value in overrides.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) and key in fields else value
    return FineTuneJobSpec.model_validate(fields)


def _hf_batch(name: str, model_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """transformers' processor output for three rows, right-padded by hand: one image (90x60), text only, and two
    images of other sizes; labels supervise the answer only (prompt, images and padding -100)."""
    processor = load_hf_processor(get_family(name).spec, model_dir)
    images = [[Image.new("RGB", (90, 60), (200, 10, 10))], [],
              [Image.new("RGB", (40, 130), (0, 120, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]]
    rows = []
    for imgs in images:
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": "What colour is the shape?"}]
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": "red and blue"}]}]
        prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        text = processor.apply_chat_template(messages, tokenize=False)
        row = processor(text=[text], images=imgs or None, return_tensors="pt", return_mm_token_type_ids=True)
        row["prompt_len"] = len(processor(text=[prompt], images=imgs or None)["input_ids"][0])
        rows.append(row)
    width = max(r["input_ids"].shape[1] for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(r[key], (0, width - r[key].shape[1]), value=value) for r in rows])

    batch = {"input_ids": pad("input_ids", processor.tokenizer.pad_token_id), "attention_mask": pad("attention_mask", 0),
             "mm_token_type_ids": pad("mm_token_type_ids", 0),
             "pixel_values": torch.cat([r["pixel_values"] for r in rows if "pixel_values" in r]),
             "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows if "image_grid_thw" in r])}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, row in enumerate(rows):
        labels[i, : row["prompt_len"]] = -100
    return batch, labels


# ----- 1. the forward contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_loss_only_equals_transformers_loss_and_token_types_equal_the_processors(name, model_dirs):
    family = get_family(name)
    model = family.load_model(model_dirs[name])
    batch, labels = _hf_batch(name, model_dirs[name])
    assert torch.equal(token_types(batch["input_ids"], model.config), batch["mm_token_type_ids"])
    assert batch["mm_token_type_ids"].eq(1).any(dim=1).tolist() == [True, False, True]
    reference = type(model).forward(model, **batch, labels=labels).loss  # transformers' own forward and loss
    family.forward_contract(model)
    without_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    ours = model(**without_types, labels=labels, loss_only=True)
    assert ours.logits is None
    torch.testing.assert_close(ours.loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(**without_types, labels=labels).loss, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(QwenVLError, match="packed sequences are not supported"):
        model(**without_types, segment_ids=torch.ones_like(labels))


@pytest.mark.parametrize("name", FAMILIES)
def test_contract_positions_give_transformers_logits_when_decoding_left_padded_rows(name, model_dirs):
    """Generation's calls (left padding, 1-D positions, cache): each step's logits equal transformers' own forward
    of that row alone (M-RoPE positions from its images), so evaluation's greedy answers are the model's."""
    family = get_family(name)
    model = family.forward_contract(family.load_model(model_dirs[name])).eval()
    batch, _ = _hf_batch(name, model_dirs[name])
    lengths = batch["attention_mask"].sum(1).tolist()
    prompts = [batch["input_ids"][i, : n - 3].tolist() for i, n in enumerate(lengths)]  # all but the last 3 ids
    followers = [batch["input_ids"][i, n - 3: n].tolist() for i, n in enumerate(lengths)]
    from qwenvl_core.generation import left_pad, positions_from_mask

    ids, mask = left_pad(prompts, 0)
    vision = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                    prompt_lengths=mask.sum(1), **vision)
        steps, cache = [out.logits[:, -1]], out.cache
        for k in range(2):
            step = torch.tensor([[f[k]] for f in followers])
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            out = model(input_ids=step, attention_mask=mask, position_ids=positions_from_mask(mask)[:, -1:],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.cache
        for row, n in enumerate(lengths):
            own = {"pixel_values": None, "image_grid_thw": None}
            patches = (batch["image_grid_thw"].prod(-1)).tolist()
            images_of = {0: [0], 1: [], 2: [1, 2]}[row]
            if images_of:
                start = sum(patches[: images_of[0]])
                own = {"pixel_values": batch["pixel_values"][start: start + sum(patches[i] for i in images_of)],
                       "image_grid_thw": batch["image_grid_thw"][images_of]}
            alone = type(model).forward(model, input_ids=batch["input_ids"][row: row + 1, : n - 1],
                                        mm_token_type_ids=batch["mm_token_type_ids"][row: row + 1, : n - 1],
                                        **own).logits[0]
            for k in range(3):
                torch.testing.assert_close(steps[k][row], alone[n - 4 + k], rtol=1e-4, atol=1e-4)


# ----- 2. LoRA targets and freeze switches ----------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_presets_and_vision_switches_resolve_per_family(name, model_dirs):
    family = get_family(name)
    model = family.load_model(model_dirs[name])
    layers = model.config.get_text_config().num_hidden_layers
    official = resolve_targets(model, family, TargetPreset.OFFICIAL)
    assert len(official) == 7 * layers and all(n.startswith("model.language_model.layers.") for n in official)
    assert resolve_targets(model, family, TargetPreset.ALL_LINEAR) == official
    attention = resolve_targets(model, family, TargetPreset.ATTENTION)
    assert len(attention) == 4 * layers and all(".self_attn." in n for n in attention)
    vision = vision_targets(model, family)
    assert vision and all(n.startswith("model.visual.blocks.") for n in vision)
    merger_names = {"model.visual.merger"} | ({f"model.visual.deepstack_merger_list.{i}" for i in range(
        len(model.config.vision_config.deepstack_visual_indexes))} if name == "qwen3-vl" else set())
    assert set(adapter_modules(model, family)) == merger_names
    vit_names = {n.rsplit(".", 1)[-1] for n in vision}
    for clash in sorted(vit_names & {"gate_proj", "up_proj", "down_proj"}):  # Qwen2.5-VL's ViT MLP
        with pytest.raises(LoraTargetError, match=f"lora.targets: '{clash}' also matches non-language"):
            resolve_targets(model, family, [clash])


def test_freeze_switches_are_validated_with_the_field_named():
    with pytest.raises(ValidationError, match="lora.freeze_language_model: nothing would train"):
        LoraSpec(freeze_language_model=True)
    with pytest.raises(ValidationError, match="lora.targets: the language model is frozen"):
        LoraSpec(freeze_language_model=True, train_adapter=True, targets="attention")
    spec = LoraSpec(freeze_language_model=True, train_adapter=True)
    assert LoraSpec.model_validate(spec.model_dump(mode="json")) == spec  # spec.json round trip


def test_only_the_merger_trains_with_a_frozen_language_model(model_dirs):
    family = get_family("qwen2.5-vl")
    model = apply_lora(load_base_model(model_dirs["qwen2.5-vl"], family, *_none_fp32()), family,
                       LoraSpec(r=4, freeze_language_model=True, train_adapter=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".visual.merger.modules_to_save." in n for n in trainable)


def _none_fp32():
    from qwenvl_core.specs import Precision, Quantization

    return Quantization.NONE, Precision.FP32


# ----- 3-6. the real loop -------------------------------------------------------------------------------------
SWITCHES = {"qwen2-vl": {}, "qwen2.5-vl": {"vision_lora": True, "train_adapter": True},
            "qwen3-vl": {"vision_lora": True, "train_adapter": True}}


@pytest.mark.parametrize("name", FAMILIES)
def test_training_learns_and_the_adapter_loads_back_with_equal_logits(name, model_dirs, synth, tmp_path):
    spec = _spec(model_dirs[name], synth, tmp_path / "run", lora=SWITCHES[name])
    rec, run = RecordingSink(), RunDir(str(tmp_path / "run"))
    trainer = Trainer(spec, Hooks(progress=[rec], metrics=[rec], events=RunDirEvents(run)), tmp_path / "work")
    result = trainer.run()
    losses = [p.loss for p in rec.progress]
    assert result.state is JobState.SUCCEEDED and len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert {"eval/loss", "eval/token_accuracy"} <= set(result.metrics)
    assert any("image feature cache off" in e.message for e in run.read_events())
    assert result.summary["image_feature_cache"] is None

    family = get_family(name)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    if SWITCHES[name]:
        assert any(".visual.merger." in k for k in saved) and any(".visual.blocks." in k and "lora_" in k
                                                                   for k in saved)
    loaded = PeftModel.from_pretrained(family.forward_contract(family.load_model(model_dirs[name])),
                                       result.adapter_dir).eval()
    rows = [trainer.data.validation[i] for i in range(3)]
    batch = Collator(trainer.processor.pad_token_id)(rows)
    batch.pop("labels")
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(**batch).logits, expected, atol=1e-3)


def test_resume_gives_the_adapter_of_the_uninterrupted_run(model_dirs, synth, tmp_path):
    spec = _spec(model_dirs["qwen2.5-vl"], synth, tmp_path / "run", lora={"train_adapter": True},
                 hyperparameters={"max_steps": 6}, checkpoint={"every_n_steps": 2}, validation_file=None)
    full = Trainer(spec, Hooks(), tmp_path / "full").run()

    def stop(step: int) -> None:
        if step == 3:
            raise _Died("the worker dies after step 3; the last checkpoint is step 2")

    with pytest.raises(_Died):
        Trainer(spec, Hooks(on_step=[stop]), tmp_path / "a").run()
    latest = LocalCheckpoints(tmp_path / "a" / "checkpoints", None).latest()
    assert latest is not None and latest.name == "step_00000002"
    resumed = Trainer(spec, Hooks(), tmp_path / "b").run(resume_from=latest)
    assert resumed.train_state.resumed_from_step == 2
    assert resumed.train_state.data_digest == full.train_state.data_digest
    expected = load_file(full.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


class _Died(RuntimeError):
    pass


def test_qlora_quantises_the_language_model_only_and_trains(model_dirs, synth, tmp_path):
    import bitsandbytes as bnb

    spec = _spec(model_dirs["qwen2-vl"], synth, tmp_path / "run", quantization="4bit", validation_file=None)
    rec = RecordingSink()
    trainer = Trainer(spec, Hooks(progress=[rec]), tmp_path / "work")
    result = trainer.run()
    quantised = {n for n, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantised and all(".language_model." in n for n in quantised)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in trainer.model.named_modules() if ".visual." in n)
    losses = [p.loss for p in rec.progress]
    assert result.state is JobState.SUCCEEDED and sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert json.loads((result.adapter_dir / "meta.json").read_text())["quantization"] == "4bit"


@pytest.mark.parametrize("name", FAMILIES)
def test_packing_is_refused_with_the_field_named(name, model_dirs, synth, tmp_path):
    spec = _spec(model_dirs[name], synth, tmp_path / "run", hyperparameters={"packing": True})
    with pytest.raises(ConfigError, match=rf"hyperparameters.packing: {name}: packed sequences are not supported.*"
                                          "M-RoPE"):
        Trainer(spec, Hooks(), tmp_path / "work").run()


# ----- 5. evaluation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_grounding_is_scored_in_pixels_through_the_familys_codec(name, model_dirs, synth):
    processor = get_family(name).load_processor(model_dirs[name])
    samples = [s for s in read_samples(synth.train) if "<box>" in s.messages[-1].text]
    items = task_items(samples, processor, max_new_tokens=200)
    assert items and all(i.boxes and i.image_size for i in items)
    v1 = codec_for("qwen-vl")
    for item in items:  # the reference (in the family's convention) read back = the dataset's box in pixels
        (expected,) = v1.parse(item.answer, item.image_size)
        assert max(abs(a - b) for a, b in zip(item.boxes[0], expected.box, strict=True)) <= 1.0
    assert score_answers(items, [i.reference for i in items], processor) == {"grounding_accuracy": 1.0}
    w, h = items[0].image_size
    far = codec_for(name).format([PixelObject("x", (0, 0, 3, 3))], (w, h))
    moved = [far] + [i.reference for i in items[1:]]
    assert score_answers(items, moved, processor)["grounding_accuracy"] == pytest.approx(1 - 1 / len(items))
    assert iou(items[0].boxes[0], items[0].boxes[0]) == 1.0
