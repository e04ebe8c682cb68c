"""Streaming readers: record locations, syntax errors at the right line, JSON lists decoded incrementally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_core.data import reader
from qwenvl_core.data.reader import iter_records


def _records(path: Path, **kw):
    return list(iter_records(path, **kw))


def test_jsonl_lines_and_indices_skip_blank_lines(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    recs = _records(path)
    assert [(r.location.line, r.location.index, r.value) for r in recs] == [(1, 0, {"a": 1}), (3, 1, {"a": 2})]


def test_jsonl_syntax_error_reported_at_its_line_and_reading_continues(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n\xff\xfe\n{"a": 3}\n')
    recs = _records(path)
    assert [r.location.line for r in recs] == [1, 2, 3, 4]
    assert "invalid JSON" in str(recs[1].issue) and str(recs[1].issue).startswith("d.jsonl:2: ")
    assert "UTF-8" in str(recs[2].issue)
    assert recs[3].value == {"a": 3}


@pytest.mark.parametrize("chunk", [16, 1 << 16])
def test_a_jsonl_line_over_the_record_cap_is_an_issue_at_its_line_and_is_not_held(tmp_path: Path, monkeypatch, chunk):
    monkeypatch.setattr(reader, "_CHUNK", chunk)
    path = tmp_path / "d.jsonl"
    ok = '{"t": "' + "x" * 89 + '"}'  # 100 bytes: exactly the cap, kept
    path.write_text(f'{ok}\n{{"t": "{"y" * 250_000}"}}\n{{"a": 3}}\n{"z" * 101}', encoding="utf-8")
    reads: list[int] = []
    real_open = Path.open

    def spying_open(self, *args, **kwargs):  # records the size of every readline of the file
        f = real_open(self, *args, **kwargs)
        readline = f.readline
        f.readline = lambda size=-1: reads.append(len(line := readline(size))) or line
        return f

    monkeypatch.setattr(Path, "open", spying_open)
    recs = _records(path, max_record_bytes=100)
    assert [(r.location.line, r.location.index) for r in recs] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert recs[0].value == json.loads(ok) and recs[2].value == {"a": 3}
    for bad in (recs[1], recs[3]):
        assert str(bad.issue).startswith(f"d.jsonl:{bad.location.line}: ") and "longer than 100 bytes" in str(bad.issue)
    assert max(reads) <= max(101, chunk)  # the long lines are never read whole (250 kB)


def test_json_list_elements_have_start_line_and_index(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('\ufeff[\n {"a": 1},\n\n {"a":\n  2}, {"a": "三"}\n]\n', encoding="utf-8")
    recs = _records(path)
    assert [(r.location.line, r.location.index, r.value) for r in recs] == [
        (2, 0, {"a": 1}), (4, 1, {"a": 2}), (5, 2, {"a": "三"}),
    ]


def test_json_list_syntax_error_names_element_and_line(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n {"a": 2,,}\n]', encoding="utf-8")
    recs = _records(path)
    assert recs[0].value == {"a": 1}
    issue = recs[1].issue
    assert issue is not None and issue.location.line == 3 and issue.location.index == 1
    assert "element 1" in issue.message


def test_json_list_missing_comma_and_truncated_file(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}\n{"a": 2}]', encoding="utf-8")
    assert "expected ','" in _records(path)[-1].issue.message
    path.write_text('[{"a": 1},\n', encoding="utf-8")
    assert "end of file" in _records(path)[-1].issue.message


def test_non_list_documents_read_as_single_records(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('{"conversations": []}', encoding="utf-8")
    # Anything not starting with "[" is JSONL: format detection (validate) then reports what is wrong.
    assert _records(path)[0].value == {"conversations": []}
    path.write_text('"x"', encoding="utf-8")
    assert _records(path)[0].value == "x"


def test_json_list_elements_larger_than_the_read_chunk(tmp_path: Path):
    big = "x" * 300_000
    values = [{"t": big, "n": i} for i in range(3)] + [12345678901234567890]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    assert [r.value for r in _records(path)] == values


def test_number_split_across_chunks_is_read_whole(tmp_path: Path):
    prefix = "[" + " " * (65536 - 4)
    path = tmp_path / "d.json"
    path.write_text(prefix + "123456789]", encoding="utf-8")
    assert [r.value for r in _records(path)] == [123456789]


def test_oversized_broken_element_stops_at_the_cap(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[{"t": "' + "x" * 200_000, encoding="utf-8")
    recs = _records(path, max_record_bytes=100_000)
    assert recs[-1].issue is not None and recs[-1].issue.location.line == 1


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_list_with_tiny_chunks_matches_json_loads(tmp_path: Path, monkeypatch, chunk):
    monkeypatch.setattr(reader, "_CHUNK", chunk)
    values = [{"s": "中\\u4e2d\"\\n", "n": -12.5e3, "t": True, "f": False, "z": None, "l": [1, [2, {}]]},
              12345, "ab\\u00e9", [], {"deep": {"x": "y" * 40}}, 0, 1e-7, False, None]
    path = tmp_path / "d.json"
    path.write_text("[ " + ",\n  ".join(json.dumps(v, ensure_ascii=False) for v in values) + " ]", "utf-8")
    records = _records(path)
    assert [r.value for r in records] == json.loads(path.read_text("utf-8"))
    assert [r.location.line for r in records] == list(range(1, len(values) + 1))
    path.write_text('[{"a": 1},\n {"a": tru },\n {"a": 3}]', "utf-8")
    broken = _records(path)[-1].issue
    assert broken is not None and broken.location.line == 2 and broken.location.index == 1


# Values json.loads accepts but nothing downstream can hold: lone surrogates (cannot be encoded as UTF-8, so no
# report, id hash or database row could carry them), nesting past the recursion limit, over-long integers.
_MSG = '"messages": [{"role": "user", "content": "hi"}]'
_REFUSED_JSONL = [
    ('{"\\ud800": 1, ' + _MSG + "}", "unpaired surrogate (U+D800)"),
    ('{"id": "\\ud800", ' + _MSG + "}", "unpaired surrogate (U+D800)"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/\\ud800.png"}}]}]}',
     "unpaired surrogate (U+D800)"),
    ('{"messages": [{"role": "user", "content": "yo\\uDFFF"}]}', "unpaired surrogate (U+DFFF)"),
    ('{"a": "\\ude00\\ud83d"}', "unpaired surrogate (U+DE00)"),  # a pair in the wrong order is two lone halves
    ("[" * 100_000 + "]" * 100_000, "nesting too deep"),
    ('{"id": ' + "1" * 5000 + "}", "number is too long"),
]


# Accepted: a well-formed surrogate pair (as a value and as a key) and an escaped backslash before "ud800".
_HELD = '{"e": "\\ud83d\\ude00", "\\uD83D\\uDE00": "\\\\ud800"}'
_HELD_VALUE = {"e": "\U0001F600", "\U0001F600": "\\ud800"}


@pytest.mark.parametrize(("line", "fragment"), _REFUSED_JSONL)
def test_jsonl_values_that_cannot_be_held_are_syntax_issues_at_their_line(tmp_path: Path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{_HELD}\n{line}\n{{"a": 3}}\n', encoding="utf-8")
    recs = _records(path)
    assert [(r.location.line, r.location.index) for r in recs] == [(1, 0), (2, 1), (3, 2)]
    assert recs[0].value == _HELD_VALUE
    assert recs[1].value is None and recs[1].issue is not None and recs[1].issue.code == "json_syntax"
    assert str(recs[1].issue).startswith("d.jsonl:2: invalid JSON: ") and fragment in recs[1].issue.message
    assert recs[2].value == {"a": 3}  # reading continues
    str(recs[1].issue).encode("utf-8")  # the message itself is storable


@pytest.mark.parametrize("chunk", [4, 1 << 16])
@pytest.mark.parametrize(("line", "fragment"), _REFUSED_JSONL)
def test_json_list_values_that_cannot_be_held_stop_at_their_element(tmp_path: Path, monkeypatch, line, fragment,
                                                                    chunk):
    monkeypatch.setattr(reader, "_CHUNK", chunk)
    path = tmp_path / "d.json"
    path.write_text(f'[{_HELD},\n {line},\n {{"a": 3}}]', encoding="utf-8")
    recs = _records(path)
    assert recs[0].value == _HELD_VALUE and len(recs) == 2
    issue = recs[1].issue
    assert issue is not None and issue.code == "json_syntax" and (issue.location.line, issue.location.index) == (2, 1)
    assert issue.message.startswith("invalid JSON in element 1: ") and fragment in issue.message
