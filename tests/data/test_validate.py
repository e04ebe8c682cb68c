"""Validation: every bad-input case produces its message at the right line and field; reports are capped."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from qwenvl_core.data import EncodeOptions, LengthPolicy, SampleRules, ValidationOptions, validate_file
from qwenvl_core.data.bundle import write_bundle

GOOD_OPENAI = {"messages": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.png"}},
                                 {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": "red"},
]}
GOOD_QWEN = {"id": "q0", "conversations": [
    {"from": "user", "value": "Picture 1: <img>imgs/a.png</img>\nWhat colour is it?"},
    {"from": "assistant", "value": "red"},
]}


def _user(content):
    return {"role": "user", "content": content}


def _asst(content, **kw):
    return {"role": "assistant", "content": content, **kw}


def _png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


OPENAI_CASES = [
    # (bad record on line 2, code, field, message fragment)
    ('{"messages": [', "json_syntax", "", "invalid JSON"),
    ([1, 2], "schema", "", "'conversations' (Qwen-VL format) or 'messages'"),
    ({"messages": []}, "schema", "messages", "non-empty list"),
    ({"messages": [_user("hi"), {"role": "tool", "content": "x"}]}, "unknown_role", "messages[1].role",
     "unknown role 'tool'"),
    ({"messages": [_user("hi"), {"role": "gpt", "content": "x"}]}, "unknown_role", "messages[1].role",
     "(use 'assistant')"),
    ({"messages": [_user("hi"), _asst(None)]}, "schema", "messages[1].content", "string or a list of parts"),
    ({"messages": [_user([{"type": "audio"}]), _asst("x")]}, "schema", "messages[0].content[0]", "type 'audio'"),
    ({"messages": [_user([{"type": "image_url", "image_url": {}}]), _asst("x")]}, "schema",
     "messages[0].content[0].image_url.url", "string URL"),
    ({"messages": [_user("hi"), _asst("x", weight=2)]}, "schema", "messages[1].weight", "0 or 1"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}, _asst("x")]}, "schema", "messages[0].weight",
     "only allowed on assistant"),
    ({"messages": [_asst("x"), _user("hi")]}, "role_order", "messages[0]", "expected a 'user' message"),
    ({"messages": [_user("a"), _user("b"), _asst("x")]}, "role_order", "messages[1]", "expected a 'assistant'"),
    ({"messages": [_user("a"), {"role": "system", "content": "s"}, _asst("x")]}, "role_order", "messages[1]",
     "system message is only allowed first"),
    ({"messages": [_user("hi")]}, "no_trainable_turn", "messages", "no assistant message"),
    ({"messages": [_user("hi"), _asst("x", weight=0)]}, "no_trainable_turn", "messages", "weight 0"),
    ({"messages": [_user("  "), _asst("x")]}, "empty_content", "messages[0]", "empty content"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "imgs/missing.png"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "image imgs/missing.png: not found"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "imgs/bad.png"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "not an image"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "invalid base64"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "remote image URLs are not supported"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "../a.png"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "inside the bundle"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "/etc/a.png"}}]), _asst("x")]},
     "image", "messages[0].content[0].image_url.url", "inside the bundle"),
    ({"messages": [_user([{"type": "image_url", "image_url": {"url": "imgs/a.png"}}] * 3), _asst("x")]},
     "too_many_images", "messages", "3 images in one sample; the limit is 2"),
    ({"messages": [_user("hi"), _asst([{"type": "image_url", "image_url": {"url": "imgs/a.png"}}])]},
     "image_role", "messages[1].content[0].image_url.url", "only allowed in user messages"),
    ({"messages": [_user("hi"), _asst("<ref>dog</ref><box>(1,2),(3</box>")]}, "box", "messages[1].content",
     "malformed coordinates"),
    ({"messages": [_user("hi"), _asst("<ref>dog</ref><box>(10,20),(1000,30)</box>")]}, "box",
     "messages[1].content", "coordinate 1000 outside [0, 1000)"),
    ({"messages": [_user("hi"), _asst("<ref>dog<box>(1,2),(3,4)</box>")]}, "box", "messages[1].content",
     "opened before"),
    ({"id": "dup", **GOOD_OPENAI}, "duplicate_id", "id", "duplicate id 'dup' (first seen at line 1)"),
    (GOOD_QWEN, "mixed_formats", "", "qwen format but the file is in openai format"),
]


@pytest.mark.parametrize(("bad", "code", "field", "fragment"), OPENAI_CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(OPENAI_CASES)])
def test_openai_bad_record_reported_at_line_2(write_jsonl, data_dir, bad, code, field, fragment):
    (data_dir / "imgs" / "bad.png").write_bytes(b"not a png at all")
    path = write_jsonl("train.jsonl", [{"id": "dup", **GOOD_OPENAI}, bad, GOOD_OPENAI])
    opts = ValidationOptions(rules=SampleRules(max_images=2))
    report = validate_file(path, options=opts)
    assert not report.ok
    assert report.records == 3 and report.valid_samples == 2
    errors = report.issues.errors
    assert [(e.code, e.location.line, e.field) for e in errors] == [(code, 2, field)], [str(e) for e in errors]
    expected_prefix = f"train.jsonl:2: {field}: " if field else "train.jsonl:2: "
    assert str(errors[0]).startswith(expected_prefix)
    assert fragment in errors[0].message


QWEN_CASES = [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "x"}]}, "unknown_role",
     "conversations[0].from", "(use 'user')"),
    ({"conversations": [{"from": "system", "value": "hi"}, {"from": "assistant", "value": "x"}]},
     "unknown_role", "conversations[0].from", "expected one of user, assistant"),
    ({"conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "x"}]}, "schema",
     "conversations[0].value", "expected a string"),
    ({"conversations": [{"from": "user", "value": "<img>imgs/a.png"}, {"from": "assistant", "value": "x"}]},
     "image_markup", "conversations[0].value", "malformed image markup"),
    ({"conversations": [{"from": "user", "value": "Picture 1: <img>imgs/nope.png</img>\nhi"},
                        {"from": "assistant", "value": "x"}]}, "image", "conversations[0].value",
     "image imgs/nope.png: not found"),
    ({"id": "q0", "conversations": GOOD_QWEN["conversations"]}, "duplicate_id", "id", "duplicate id 'q0'"),
    ({"conversations": "hi"}, "schema", "conversations", "got a string"),
]


@pytest.mark.parametrize(("bad", "code", "field", "fragment"), QWEN_CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(QWEN_CASES)])
def test_qwen_json_list_bad_element_reported_at_its_line_and_index(data_dir, bad, code, field, fragment):
    text = "[\n" + json.dumps(GOOD_QWEN) + ",\n" + json.dumps(bad, ensure_ascii=False) + "\n]\n"
    path = data_dir / "train.json"
    path.write_text(text, encoding="utf-8")
    report = validate_file(path)
    errors = report.issues.errors
    assert [(e.code, e.location.line, e.location.index, e.field) for e in errors] == [(code, 3, 1, field)], \
        [str(e) for e in errors]
    assert fragment in errors[0].message
    assert report.format is not None and report.format.value == "qwen"


def test_data_url_images_and_weight_zero_turns_are_valid(write_jsonl):
    record = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        _user([{"type": "image_url", "image_url": {"url": _png_data_url()}}, {"type": "text", "text": "?"}]),
        _asst("draft", weight=0), _user("again"), _asst("final", weight=1),
    ]}
    report = validate_file(write_jsonl("t.jsonl", [record]))
    assert report.ok and report.valid_samples == 1 and report.stats.images == 1


def test_warnings_do_not_fail_and_unknown_keys_are_named(write_jsonl):
    record = {"messages": [_user("hi"), _asst("x"), _user("more?")], "extra": 1}
    report = validate_file(write_jsonl("t.jsonl", [record]))
    assert report.ok
    assert sorted((w.code, w.field) for w in report.issues.warnings) == [
        ("trailing_turn", "messages[2]"), ("unknown_key", "extra")]


def test_errors_are_capped_but_all_counted(write_jsonl):
    records = [GOOD_OPENAI] + ['{"broken'] * 30
    report = validate_file(write_jsonl("t.jsonl", records), options=ValidationOptions(max_issues=5))
    body = report.to_dict()
    assert body["error_count"] == 30 and len(body["errors"]) == 5 and body["errors_truncated"]
    assert [e["line"] for e in body["errors"]] == [2, 3, 4, 5, 6]
    assert body["valid_samples"] == 1 and body["invalid_samples"] == 30


def test_too_long_rejected_or_truncated_at_a_turn_boundary(write_jsonl, processor):
    long_turns = [_user(GOOD_OPENAI["messages"][0]["content"]), _asst("red")]
    long_turns += [_user("What colour is the square? " * 4), _asst("blue " * 20)]
    path = write_jsonl("t.jsonl", [GOOD_OPENAI, {"messages": long_turns}])
    reject = ValidationOptions(encode=EncodeOptions(max_length=60))
    report = validate_file(path, processor, reject)
    assert [(e.code, e.location.line, e.field) for e in report.issues.errors] == [("too_long", 2, "messages")]
    assert "more than the maximum length 60" in report.issues.errors[0].message
    truncate = ValidationOptions(encode=EncodeOptions(max_length=60, length_policy=LengthPolicy.TRUNCATE))
    report = validate_file(path, processor, truncate)
    assert report.ok and report.stats.truncated_samples == 1
    assert report.issues.warnings[0].code == "truncated" and "first 3 of 5 turns" in report.issues.warnings[0].message
    assert report.stats.max_length is not None and report.stats.max_length <= 60


def test_truncation_impossible_is_an_error(write_jsonl, processor):
    path = write_jsonl("t.jsonl", [{"messages": [_user("word " * 80), _asst("x")]}])
    opts = ValidationOptions(encode=EncodeOptions(max_length=40, length_policy=LengthPolicy.TRUNCATE))
    report = validate_file(path, processor, opts)
    assert report.issues.errors[0].code == "too_long" and "no prefix of whole turns" in report.issues.errors[0].message


def test_chinese_text_survives_validation_and_error_messages(write_jsonl, processor):
    good = {"id": "样本一", "messages": [_user([{"type": "image_url", "image_url": {"url": "imgs/a.png"}},
                                             {"type": "text", "text": "图中是什么颜色？"}]), _asst("红色。")]}
    bad = {"id": "样本二", "messages": [_user("你好"), _asst("<ref>红色的圆</ref><box>(1,2),(3</box>")]}
    missing = {"messages": [_user([{"type": "image_url", "image_url": {"url": "图片/猫.png"}}]), _asst("猫")]}
    report = validate_file(write_jsonl("中文.jsonl", [good, bad, missing, {"id": "样本一", **GOOD_OPENAI}]),
                           processor)
    texts = [str(e) for e in report.issues.errors]
    assert texts[0].startswith("中文.jsonl:2: messages[1].content: box '<box>(1,2),(3</box>'")
    assert texts[1] == "中文.jsonl:3: messages[0].content[0].image_url.url: image 图片/猫.png: not found"
    assert texts[2] == "中文.jsonl:4: id: duplicate id '样本一' (first seen at line 1)"
    dumped = json.dumps(report.to_dict(), ensure_ascii=False)
    assert "样本一" in dumped and "中文.jsonl" in dumped
    assert report.stats.text_tokens is not None and report.stats.supervised_tokens > 0


def test_empty_file_and_missing_file(tmp_path: Path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert [e.code for e in validate_file(empty).issues.errors] == ["empty_file"]
    missing = validate_file(tmp_path / "nope.jsonl")
    assert not missing.ok and "file not found" in missing.issues.errors[0].message


def test_bundle_report_names_archive_and_inner_file(data_dir, write_jsonl):
    data = write_jsonl("train.jsonl", [GOOD_OPENAI, {"messages": [_user("hi")]}])
    archive = write_bundle(data, data_dir / "up.tar.gz", [data_dir / "imgs" / "a.png"])
    report = validate_file(archive)
    assert str(report.issues.errors[0]).startswith("up.tar.gz:train.jsonl:2: messages: nothing to train on")
    assert report.valid_samples == 1


def test_stats_count_tokens_with_a_processor(write_jsonl, processor):
    report = validate_file(write_jsonl("t.jsonl", [GOOD_OPENAI, GOOD_OPENAI]), processor)
    stats = report.stats
    assert stats.samples == 2 and stats.images == 2
    assert stats.image_tokens == 2 * (processor.n_queries + 2)
    assert stats.total_tokens == stats.text_tokens + stats.image_tokens
    assert stats.min_length == stats.max_length and sum(stats.histogram) == 2


def test_image_pixel_and_byte_limits_are_configurable(write_jsonl):
    from qwenvl_core.images import ImageLimits

    path = write_jsonl("t.jsonl", [GOOD_OPENAI])
    field = "messages[0].content[0].image_url.url"
    report = validate_file(path, options=ValidationOptions(image_limits=ImageLimits(max_pixels=100)))
    assert [(e.field, e.location.line) for e in report.issues.errors] == [(field, 1)]
    assert "image imgs/a.png: too many pixels (16x16 = 256 > limit 100)" in report.issues.errors[0].message
    report = validate_file(path, options=ValidationOptions(image_limits=ImageLimits(max_bytes=10)))
    assert "too many bytes" in report.issues.errors[0].message
    assert validate_file(path, options=ValidationOptions(check_images=False)).ok


def test_id_index_finds_duplicates_across_growth():
    from qwenvl_core.data.validate import IdIndex

    index = IdIndex(capacity=4)
    assert all(index.add(f"id-{i}", i + 1) is None for i in range(5000))
    assert len(index) == 5000
    assert index.add("id-17", 9999) == 18 and index.add("id-4999", 1) == 5000
    assert index.add("新的", 7) is None and index.add("新的", 8) == 7


def test_id_index_accepts_any_str():
    from qwenvl_core.data.validate import IdIndex

    index = IdIndex()
    assert index.add("\ud800", 3) is None and index.add("\ud800", 4) == 3 and index.add("\udc00", 5) is None


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"\\ud800": 1, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yo"}]}',
     "unpaired surrogate (U+D800)"),
    ('{"id": "\\ud800", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yo"}]}',
     "unpaired surrogate (U+D800)"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/\\ud800.png"}}]},'
     ' {"role": "assistant", "content": "yo"}]}', "unpaired surrogate (U+D800)"),
    ("[" * 100_000 + "]" * 100_000, "nesting too deep"),
    ('{"messages": [], "id": ' + "1" * 5000 + "}", "number is too long"),
])
def test_unholdable_values_are_reported_and_the_report_is_storable(write_jsonl, line, fragment):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    report = validate_file(write_jsonl("t.jsonl", [good, line, good]))
    assert (report.records, report.valid_samples, report.issues.error_count) == (3, 2, 1)
    issue = report.issues.errors[0]
    assert issue.code == "json_syntax" and issue.location.line == 2 and fragment in issue.message
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # what the service stores
