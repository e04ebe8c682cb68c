"""Formats: both round-trip to the same internal samples; image sources resolve inside the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.data import DataError, DataFormat, Sample, read_samples, to_openai_record, to_qwen_record
from qwenvl_core.data.formats import detect_format, resolve_image_source
from qwenvl_core.data.synth import generate_samples


def _write(path: Path, fmt: DataFormat, samples: list[Sample], base: Path) -> Path:
    if fmt is DataFormat.QWEN:
        path.write_text(json.dumps([to_qwen_record(s, base) for s in samples], ensure_ascii=False), "utf-8")
    else:
        lines = [json.dumps(to_openai_record(s, base), ensure_ascii=False) for s in samples]
        path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def test_both_formats_round_trip_to_the_same_samples(tmp_path: Path):
    samples = generate_samples(12, seed=4, image_dir=tmp_path / "images", image_size=48)
    samples.append(Sample("中文", [Message("user", [TextPart("第一张："), ImagePart(tmp_path / "images" / "000000.png"),
                                                   TextPart("这是什么形状？")]), text_message("assistant", "圆形。")]))
    qwen = read_samples(_write(tmp_path / "d.json", DataFormat.QWEN, samples, tmp_path))
    openai = read_samples(_write(tmp_path / "d.jsonl", DataFormat.OPENAI, samples, tmp_path))
    assert qwen == openai == samples
    assert openai[-1].messages[0].parts[0] == TextPart("第一张：")


def test_openai_only_features_do_not_fit_the_official_format(tmp_path: Path):
    sample = Sample("s", [text_message("system", "sys"), text_message("user", "q"), text_message("assistant", "a")])
    with pytest.raises(DataError, match="no official-format equivalent"):
        to_qwen_record(sample, tmp_path)
    weighted = Sample("w", [text_message("user", "q"), Message("assistant", [TextPart("a")], trainable=False),
                            text_message("user", "q"), text_message("assistant", "b")])
    record = to_openai_record(weighted, tmp_path)
    assert record["messages"][1]["weight"] == 0 and "weight" not in record["messages"][3]
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(record) + "\n", "utf-8")
    assert read_samples(path) == [weighted]


def test_embedded_images_become_data_urls(tmp_path: Path):
    samples = generate_samples(1, seed=0, image_dir=tmp_path / "images", image_size=32)
    record = to_openai_record(samples[0], tmp_path, embed_images=True)
    url = record["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(record) + "\n", "utf-8")
    (sample,) = read_samples(path)
    assert sample.messages[0].parts[0] == ImagePart(url)


def test_detect_format_and_resolve_sources(tmp_path: Path):
    assert detect_format({"conversations": []}) is DataFormat.QWEN
    assert detect_format({"messages": []}) is DataFormat.OPENAI
    assert detect_format([]) is None
    assert resolve_image_source("imgs/a.png", tmp_path) == tmp_path / "imgs" / "a.png"
    assert resolve_image_source("data:image/png;base64,AA==", tmp_path) == "data:image/png;base64,AA=="
    for bad in ("http://x/a.png", "/abs.png", "a/../../b.png", "C:\\x.png", " "):
        with pytest.raises(DataError):
            resolve_image_source(bad, tmp_path)
