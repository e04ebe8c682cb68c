"""The rendered pretraining data (``qwenvl_core.pretrain.render``) and the pretraining recipe (``recipe``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwenvl_core.data import encode_sample, read_samples, validate_file
from qwenvl_core.models.qwen_vl.grounding import parse_grounding
from qwenvl_core.models.registry import detect_family
from qwenvl_core.pretrain import render
from qwenvl_core.pretrain.recipe import PretrainConfig, batch_for, pretrain


def _pixels(s: render.Sample) -> np.ndarray:
    return np.asarray(s.messages[0].images[0].source)


@pytest.mark.parametrize("task", list(render.TASKS))
def test_samples_are_a_function_of_seed_and_index(task: str) -> None:
    a, b, other = render.sample(task, 3, 7), render.sample(task, 3, 7), render.sample(task, 3, 8)
    assert [m.text for m in a.messages] == [m.text for m in b.messages]
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(other))
    assert render.mixture((task,), 3, 7, 1)[0].messages[1].text == a.messages[1].text


@pytest.mark.parametrize("task", list(render.TASKS))
def test_the_question_alone_does_not_give_the_answer(task: str) -> None:
    answers: dict[str, set[str]] = {}
    for i in range(150):
        s = render.sample(task, 0, i)
        answers.setdefault(s.messages[0].text, set()).add(s.messages[1].text)
    # Some question text is asked with several different answers: only the pixels tell them apart.
    most_asked = max(answers.values(), key=len)
    assert len(most_asked) >= 2, (task, answers)


def test_grounding_boxes_cover_the_named_object() -> None:
    for i in range(10):
        s = render.sample("ground", 0, i)
        colour = s.messages[0].text.split()[3]  # "Where is the <colour> <shape>?"
        box = parse_grounding(s.messages[1].text)[0].box
        x1, y1, x2, y2 = (round(v / 1000 * render.IMAGE_SIZE) for v in (box.x1, box.y1, box.x2, box.y2))
        crop = _pixels(s)[y1:y2 + 1, x1:x2 + 1]
        hits = (crop == np.array(render.COLOURS[colour])).all(-1).sum()
        assert hits > 0.25 * crop.shape[0] * crop.shape[1], (i, s.messages[1].text)


def test_written_dataset_is_valid_platform_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    samples = render.mixture(tuple(render.TASKS), 0, 0, 2 * len(render.TASKS))
    path = render.write_dataset(tmp_path, samples, "train")
    processor = detect_family(tiny_model_dir).load_processor(tiny_model_dir)
    report = validate_file(path, processor)
    assert report.ok, report.to_dict()["errors"]
    read = read_samples(path, processor)
    assert [m.text for s in read for m in s.messages] == [m.text for s in samples for m in s.messages]
    row = encode_sample(read[0], processor)
    assert row.pixel_values is not None and row.pixel_values.shape[0] == 1
    assert row.input_ids.count(processor.tokenizer.img_pad_id) == processor.n_queries


def test_a_few_pretraining_steps_lower_the_loss(tiny_model_dir: Path) -> None:
    family = detect_family(tiny_model_dir)
    model, processor = family.load_model(tiny_model_dir), family.load_processor(tiny_model_dir)
    config = PretrainConfig(steps=12, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0)
    from qwenvl_core.data import Collator

    probe = batch_for(1000, config, processor, Collator(processor.tokenizer.eod_id))  # never trained on
    with torch.no_grad():
        before = float(model(**probe, loss_only=True).loss)
    vision_before = model.transformer.visual.conv1.weight.detach().clone()
    lm_before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    log = pretrain(model, processor, config, log_every=4)
    with torch.no_grad():
        after = float(model(**probe, loss_only=True).loss)
    assert after < before - 0.5, (before, after)
    assert log.losses[-1][1] < log.losses[0][1]
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, lm_before)  # the LM trains ...
    assert torch.equal(model.transformer.visual.conv1.weight, vision_before)  # ... on stage 1's tower
    # The tower is frozen only during the stage.
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable_before


def test_vision_warm_up_trains_the_tower_and_reports_held_out_accuracy(tiny_model_dir: Path) -> None:
    from qwenvl_core.pretrain.vision_warmup import LABELS, warm_up_vision

    model = detect_family(tiny_model_dir).load_model(tiny_model_dir)
    visual = model.transformer.visual
    before = {n: p.detach().clone() for n, p in visual.named_parameters()}
    accuracy = warm_up_vision(visual, 112, steps=3, batch_size=4)
    assert set(accuracy) == set(LABELS) and all(0.0 <= a <= 1.0 for a in accuracy.values())
    changed = [n for n, p in visual.named_parameters() if not torch.equal(p, before[n])]
    assert "conv1.weight" in changed and "attn_pool.kv_proj.weight" in changed


def test_vision_warm_up_box_target_is_scored_by_iou(tiny_model_dir: Path) -> None:
    from qwenvl_core.pretrain.vision_warmup import BOX, box_hits, warm_up_vision

    visual = detect_family(tiny_model_dir).load_model(tiny_model_dir).transformer.visual
    accuracy = warm_up_vision(visual, 112, steps=2, batch_size=4, targets=("colour", BOX), side=(16, 60),
                              n_test=8)
    assert set(accuracy) == {"colour", BOX} and 0.0 <= accuracy[BOX] <= 1.0
    target = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]])
    # the same box; one shifted by a tenth of its side (IoU 0.67); one shifted by half (IoU 0.33)
    predicted = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.14, 0.1, 0.54, 0.5], [0.3, 0.1, 0.7, 0.5]])
    assert box_hits(predicted, target).tolist() == [True, True, False]


def test_pretrained_base_is_a_drop_in_for_the_tiny_preset(tmp_path: Path, tiny_model_dir: Path) -> None:
    from qwenvl_core.models.qwen_vl.weights import read_state_dict
    from qwenvl_core.pretrain.recipe import pretrain_base

    out, log = pretrain_base(tmp_path / "base", PretrainConfig(steps=2, batch_size=4, vision_warmup_steps=2),
                             log_every=1)
    assert len(log.losses) == 2 and set(log.vision_warmup) == {"shape", "colour", "region"}
    ours, tiny = read_state_dict(out), read_state_dict(tiny_model_dir)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tiny.items()}
    assert (out / "qwen.tiktoken").read_bytes() == (tiny_model_dir / "qwen.tiktoken").read_bytes()
    assert detect_family(out).load_processor(out).n_queries == 16


# ----- the shipped pretrained base (qwenvl_core/assets/qwen-vl-tiny-seeing; built by qwenvl_core.pretrain.ship)


@pytest.fixture(scope="module")
def seeing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``qwen-vl-tiny-seeing`` materialised as ``qwenvl model init`` and the local stack do."""
    from qwenvl_core.models.registry import family_for_preset

    out = tmp_path_factory.mktemp("seeing") / "qwen-vl-tiny-seeing"
    return family_for_preset("qwen-vl-tiny-seeing").materialize("qwen-vl-tiny-seeing", out)


def test_shipped_base_loads_with_the_family_loader_and_sees(seeing_dir: Path) -> None:
    from qwenvl_core.autotune import DEFAULTS_FILE, PRETRAINED_TINY, base_defaults
    from qwenvl_core.models.qwen_vl.presets import build_config
    from qwenvl_core.models.shipped import MANIFEST_FILE, shipped_dir
    from qwenvl_core.pretrain.recipe import evaluate_tasks

    shipped = shipped_dir("qwen-vl-tiny-seeing")
    for file in ("config.json", "model.safetensors", "qwen.tiktoken", DEFAULTS_FILE, MANIFEST_FILE):
        assert (seeing_dir / file).read_bytes() == (shipped / file).read_bytes(), file
    family = detect_family(seeing_dir)
    shapes = {k: v for k, v in family.load_config(seeing_dir).to_dict().items() if k != "dtype"}  # saved: float32
    assert shapes == {k: v for k, v in build_config("qwen-vl-tiny-seeing").to_dict().items() if k != "dtype"}
    model, processor = family.load_model(seeing_dir), family.load_processor(seeing_dir)  # strict: every key
    # `auto` hyperparameters on it read the measured defaults shipped with it
    assert base_defaults(seeing_dir) == (PRETRAINED_TINY, DEFAULTS_FILE)
    # It answers questions about held-out pictures (the random qwen-vl-tiny scores 0 on both: docs/pretraining.md;
    # chance is 1/7 for colour, 1/8 for shape).
    scores = evaluate_tasks(model, processor, ("colour", "shape"), seed=7, n_per_task=20,
                            stop_ids=family.stop_token_ids(processor))
    assert scores["colour"] >= 0.9 and scores["shape"] >= 0.3, scores


def test_recipe_reproduces_a_prefix_of_the_shipped_run() -> None:
    """The full recipe takes minutes (``python -m qwenvl_core.pretrain.ship --check`` rebuilds it and compares bit
    for bit); the suite re-runs its first ``PREFIX`` steps of each stage and compares them with the fingerprint the
    build recorded, so a change to the recipe, the rendered data or the model's numerics shows here."""
    import dataclasses
    import json

    from qwenvl_core.models.shipped import verify
    from qwenvl_core.pretrain.ship import NAME, PREFIX, RECIPE, fingerprints_match, prefix_fingerprint

    manifest = verify(NAME)  # every shipped file matches its sha256
    assert manifest["recipe"] == json.loads(json.dumps(dataclasses.asdict(RECIPE)))
    assert manifest["prefix"]["steps"] == list(PREFIX)
    recorded = manifest["prefix"]["fingerprint"]
    assert fingerprints_match(prefix_fingerprint(), recorded) == []
    # the comparison tells runs apart: another seed's prefix differs in (nearly) every tensor
    other = fingerprints_match(prefix_fingerprint(dataclasses.replace(RECIPE, seed=1)), recorded)
    assert len(other) > len(recorded) // 2


def test_shipped_files_are_checked_and_its_weights_are_not_redrawn(tmp_path: Path) -> None:
    import shutil

    from qwenvl_core.errors import ConfigError, ModelLoadError
    from qwenvl_core.models.shipped import check_files, copy_shipped, shipped_dir, verify

    manifest = verify("qwen-vl-tiny-seeing")
    copy = tmp_path / "copy"
    shutil.copytree(shipped_dir("qwen-vl-tiny-seeing"), copy)
    check_files(copy, manifest)
    (copy / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    with pytest.raises(ModelLoadError, match=r"model\.safetensors .* do not match"):
        check_files(copy, manifest)
    (copy / "qwen.tiktoken").unlink()
    with pytest.raises(ModelLoadError, match="missing qwen.tiktoken"):
        check_files(copy, manifest)
    with pytest.raises(ConfigError, match="--seed"):
        copy_shipped("qwen-vl-tiny-seeing", tmp_path / "a", seed=3)
    with pytest.raises(ConfigError, match="--dtype"):
        copy_shipped("qwen-vl-tiny-seeing", tmp_path / "b", dtype=torch.bfloat16)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
