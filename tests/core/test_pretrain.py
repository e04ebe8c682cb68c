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
