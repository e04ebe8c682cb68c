"""SFT encoding: golden ChatML and label masks in both formats, parity with the official preprocess,
weight-0 turns, the length policy and pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_core.data import (
    IGNORE_INDEX,
    DataError,
    EncodeOptions,
    LabelMask,
    LengthError,
    LengthPolicy,
    SFTDataset,
    encode_sample,
    read_samples,
    tokenize_sample,
)

PADS = "<imgpad>" * 16  # the tiny preset has 16 queries per image
BOX = "<ref>the circle</ref><box>(10,20),(300,400)</box>"
QWEN_GOLDEN = {"id": "golden", "conversations": [
    {"from": "user", "value": "Picture 1: <img>imgs/a.png</img>\nPicture 2: <img>imgs/b.png</img>\nWhich one is red?"},
    {"from": "assistant", "value": "The first."},
    {"from": "user", "value": "Where is the circle?"},
    {"from": "assistant", "value": BOX},
]}
OPENAI_GOLDEN = {"id": "golden", "messages": [
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "imgs/a.png"}},
        {"type": "image_url", "image_url": {"url": "imgs/b.png"}},
        {"type": "text", "text": "Which one is red?"}]},
    {"role": "assistant", "content": "The first."},
    {"role": "user", "content": "Where is the circle?"},
    {"role": "assistant", "content": BOX},
]}
GOLDEN_CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\nPicture 1: <img>{PADS}</img>\nPicture 2: <img>{PADS}</img>\nWhich one is red?<|im_end|>\n"
    "<|im_start|>assistant\nThe first.<|im_end|>\n"
    "<|im_start|>user\nWhere is the circle?<|im_end|>\n"
    f"<|im_start|>assistant\n{BOX}<|im_end|>\n"
)
GOLDEN_OFFICIAL_RUNS = [
    "<|im_start|>", "<|im_end|>\n<|im_start|>", "<|im_end|>\n<|im_start|>", "The first.<|im_end|>\n<|im_start|>",
    "<|im_end|>\n<|im_start|>", f"{BOX}<|im_end|>\n",
]
GOLDEN_ASSISTANT_ONLY_RUNS = ["The first.<|im_end|>", f"{BOX}<|im_end|>"]


def _supervised_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of consecutive positions that carry loss."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are copies of the ids (the model shifts them)
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(params=["qwen", "openai"])
def golden_file(request, data_dir: Path) -> Path:
    if request.param == "qwen":
        path = data_dir / "golden.json"
        path.write_text(json.dumps([QWEN_GOLDEN]), encoding="utf-8")
    else:
        path = data_dir / "golden.jsonl"
        path.write_text(json.dumps(OPENAI_GOLDEN) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("mask", "runs"), [(LabelMask.OFFICIAL, GOLDEN_OFFICIAL_RUNS),
                                            (LabelMask.ASSISTANT_ONLY, GOLDEN_ASSISTANT_ONLY_RUNS)])
def test_golden_chatml_and_label_mask_in_both_formats(golden_file, processor, mask, runs):
    (sample,) = read_samples(golden_file, processor)
    encoded = encode_sample(sample, processor, EncodeOptions(mask=mask))
    tok = processor.tokenizer
    assert tok.decode(encoded.input_ids) == GOLDEN_CHATML
    assert _supervised_runs(encoded.input_ids, encoded.labels, tok) == runs
    assert encoded.pixel_values is not None and tuple(encoded.pixel_values.shape) == (2, 3, 112, 112)
    assert encoded.pixel_values[0].mean() != encoded.pixel_values[1].mean()  # a.png then b.png, in span order
    image_ids = {tok.img_start_id, tok.img_pad_id, tok.img_end_id}
    assert all(label not in image_ids for label in encoded.labels)


def _official_preprocess(conversations, tokenizer, system_message="You are a helpful assistant."):
    """The official finetune.py ``preprocess`` for one text-only sample, transcribed."""
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    nl = tokenizer.encode("\n")
    system = [im_start] + tokenizer.encode("system") + nl + tokenizer.encode(system_message) + [im_end] + nl
    input_id, target = list(system), [im_start] + [IGNORE_INDEX] * (len(system) - 3) + [im_end] + nl
    for sentence in conversations:
        role = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}[sentence["from"]]
        role_ids = tokenizer.encode(role)
        _input_id = role_ids + nl + tokenizer.encode(sentence["value"]) + [im_end] + nl
        if role == "<|im_start|>user":
            _target = [im_start] + [IGNORE_INDEX] * (len(_input_id) - 3) + [im_end] + nl
        else:
            _target = [im_start] + [IGNORE_INDEX] * len(role_ids) + _input_id[len(role_ids) + 1:-2] + [im_end] + nl
        input_id += _input_id
        target += _target
    return input_id, target


def test_matches_official_preprocess_on_text_samples(data_dir, processor):
    conversations = [
        {"from": "user", "value": "你好！图里有什么？"},
        {"from": "assistant", "value": "一个<ref>红色的圆</ref><box>(1,2),(300,400)</box>。"},
        {"from": "user", "value": "And the square?\nAnswer briefly."},
        {"from": "assistant", "value": "It is blue."},
    ]
    path = data_dir / "t.json"
    path.write_text(json.dumps([{"id": "x", "conversations": conversations}], ensure_ascii=False), encoding="utf-8")
    (sample,) = read_samples(path)
    tokenized = tokenize_sample(sample, processor)
    assert (tokenized.input_ids, tokenized.labels) == _official_preprocess(conversations, processor.tokenizer)
    assert processor.tokenizer.decode(tokenized.input_ids).count("红色的圆") == 1


def _openai(messages):
    return {"messages": messages}


def test_weight_zero_assistant_turn_carries_no_loss(write_jsonl, processor):
    record = _openai([
        {"role": "system", "content": "简短回答。"},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good answer", "weight": 1},
    ])
    (sample,) = read_samples(write_jsonl("t.jsonl", [record]))
    tok = processor.tokenizer
    official = tokenize_sample(sample, processor)
    assert tok.decode(official.input_ids).startswith("<|im_start|>system\n简短回答。<|im_end|>\n")
    assert _supervised_runs(official.input_ids, official.labels, tok) == [
        "<|im_start|>", "<|im_end|>\n<|im_start|>", "<|im_end|>\n", "<|im_start|>", "<|im_end|>\n<|im_start|>",
        "good answer<|im_end|>\n"]
    alternative = tokenize_sample(sample, processor, EncodeOptions(mask=LabelMask.ASSISTANT_ONLY))
    assert _supervised_runs(alternative.input_ids, alternative.labels, tok) == ["good answer<|im_end|>"]


def _long_sample(write_jsonl):
    image = {"type": "image_url", "image_url": {"url": "imgs/a.png"}}
    record = _openai([
        {"role": "user", "content": [image, {"type": "text", "text": "Q1"}]}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": [image, image, {"type": "text", "text": "Q2"}]},
        {"role": "assistant", "content": "A2 " * 10},
    ])
    (sample,) = read_samples(write_jsonl("t.jsonl", [record]))
    return sample


def test_truncation_cuts_at_a_turn_boundary_never_inside_an_image_span(write_jsonl, processor):
    sample = _long_sample(write_jsonl)
    full = tokenize_sample(sample, processor)
    tok = processor.tokenizer
    for max_length in range(30, len(full.input_ids)):
        opts = EncodeOptions(max_length=max_length, length_policy=LengthPolicy.TRUNCATE)
        try:
            enc = encode_sample(sample, processor, opts)
        except DataError:
            continue
        assert len(enc.input_ids) <= max_length
        assert tok.decode(enc.input_ids).endswith("A1<|im_end|>\n")  # ends after a whole assistant turn
        spans = enc.input_ids.count(tok.img_start_id)
        assert spans == enc.input_ids.count(tok.img_end_id) == len(enc.pixel_values) == 1
        assert enc.input_ids.count(tok.img_pad_id) == spans * processor.n_queries


def test_reject_policy_and_impossible_truncation(write_jsonl, processor):
    sample = _long_sample(write_jsonl)
    n = len(tokenize_sample(sample, processor).input_ids)
    with pytest.raises(LengthError, match=f"{n} tokens, more than the maximum length {n - 1}"):
        tokenize_sample(sample, processor, EncodeOptions(max_length=n - 1))
    with pytest.raises(DataError, match=r"t.jsonl:1: sample '#0': .*no prefix of whole turns"):
        encode_sample(sample, processor, EncodeOptions(max_length=10, length_policy=LengthPolicy.TRUNCATE))
    assert len(encode_sample(sample, processor, EncodeOptions(max_length=n)).input_ids) == n


def test_dataset_encodes_lazily_and_reports_lengths(write_jsonl, processor):
    sample = _long_sample(write_jsonl)
    dataset = SFTDataset([sample, sample], processor)
    assert len(dataset) == 2 and dataset.lengths() == [len(dataset[0].input_ids)] * 2
    assert dataset[1].pixel_values.shape[0] == 3
