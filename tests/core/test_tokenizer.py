"""QWenTokenizer (tiktoken, official special ids) and the deterministic tiny vocabulary."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from qwenvl_core.errors import TokenizerError
from qwenvl_core.models.qwen_vl.tiny_tokenizer import train_tiny_tokenizer
from qwenvl_core.models.qwen_vl.tokenizer import N_SPECIAL, QWenTokenizer, special_token_ids


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "qwen.tiktoken")


@pytest.fixture(scope="module")
def tok(tiny_path: Path) -> QWenTokenizer:
    return QWenTokenizer.from_file(tiny_path)


def test_special_ids_match_official_table() -> None:
    ids = special_token_ids(151_643)
    assert ids["<|endoftext|>"] == 151643
    assert ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645
    assert ids["<|extra_0|>"] == 151646
    assert ids["<|extra_204|>"] == 151850
    assert (ids["<ref>"], ids["</ref>"]) == (151851, 151852)
    assert (ids["<box>"], ids["</box>"]) == (151853, 151854)
    assert (ids["<quad>"], ids["</quad>"]) == (151855, 151856)
    assert (ids["<img>"], ids["</img>"], ids["<imgpad>"]) == (151857, 151858, 151859)
    assert len(ids) == N_SPECIAL == 217
    assert sorted(ids.values()) == list(range(151643, 151860))


def test_tiny_tokenizer_is_deterministic_with_exactly_1024_ranks(tmp_path: Path, tiny_path: Path) -> None:
    again = train_tiny_tokenizer(tmp_path / "again" / "qwen.tiktoken")
    assert again.read_bytes() == tiny_path.read_bytes()
    lines = tiny_path.read_text().splitlines()
    assert len(lines) == 1024
    assert [int(line.split()[1]) for line in lines] == list(range(1024))
    assert base64.b64decode(lines[0].split()[0]) == b"!"  # GPT-2 byte order, as the official file
    assert len({line.split()[0] for line in lines}) == 1024


def test_sizes_and_ids(tok: QWenTokenizer) -> None:
    assert tok.n_ranks == 1024
    assert tok.vocab_size == len(tok) == 1024 + 217
    assert tok.eod_id == 1024
    assert (tok.im_start_id, tok.im_end_id) == (1025, 1026)
    assert (tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id) == (1232, 1233, 1234, 1235)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (1238, 1239, 1240)
    assert tok.image_span(3) == [1238, 1240, 1240, 1240, 1239]
    assert tok.special_id("<quad>") == tok.quad_start_id == 1236


@pytest.mark.parametrize(
    "text",
    [
        "You are a helpful assistant. How many red circles are there?",
        "图片里有一个红色的圆形。",
        "emoji 😀👍🏽 and café",
        "<|im_start|>user\nPicture 1: <img>a.png</img>\n<ref>狗</ref><box>(1,2),(3,4)</box><|im_end|>\n",
        "  leading spaces\n\n\ttabs and\r\nwindows newlines  ",
    ],
)
def test_round_trip(tok: QWenTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_chinese_uses_merges(tok: QWenTokenizer) -> None:
    text = "图片里有一个红色的圆形。"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_special_surface_forms(tok: QWenTokenizer) -> None:
    ids = tok.encode("a<|im_end|>b<img>")
    assert tok.im_end_id in ids and tok.img_start_id in ids
    ordinary = tok.encode_ordinary("a<|im_end|>b<img>")
    assert not any(tok.is_special(i) for i in ordinary)
    assert tok.encode("<ref>", allowed_special=set()) == tok.encode_ordinary("<ref>")
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_nfc_normalisation(tok: QWenTokenizer) -> None:
    assert tok.encode("caf" + "e\u0301") == tok.encode("caf\u00e9")
    assert tok.encode_ordinary("e\u0301") == tok.encode_ordinary("\u00e9")


def test_decode_out_of_vocab(tok: QWenTokenizer) -> None:
    hello = tok.encode("hello")
    assert tok.decode([*hello, tok.vocab_size + 5], skip_special_tokens=True) == "hello"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([*hello, tok.vocab_size + 5])


def test_invalid_utf8_is_replaced(tok: QWenTokenizer) -> None:
    ids = tok.encode("龘")  # not in the tiny corpus: one token per byte
    assert [tok.decode_token(i) for i in ids] == [bytes([b]) for b in "龘".encode()]
    assert tok.decode(ids[:2]) == "\ufffd"


def test_from_dir(tiny_path: Path) -> None:
    assert QWenTokenizer.from_dir(tiny_path.parent).n_ranks == 1024


def test_missing_file_names_path_and_git_lfs(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="git-lfs") as err:
        QWenTokenizer.from_dir(tmp_path)
    assert str(tmp_path / "qwen.tiktoken") in str(err.value)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _byte_lines() -> list[str]:
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("not-a-valid-line", "line 3"),
        ("!!!! 256", "line 3: invalid base64"),
        ("YWI= x", "line 3"),
    ],
)
def test_malformed_line_names_line_number(tmp_path: Path, bad_line: str, message: str) -> None:
    lines = _byte_lines()
    lines.insert(2, bad_line)
    with pytest.raises(TokenizerError, match=message):
        QWenTokenizer.from_file(_write_lines(tmp_path / "qwen.tiktoken", lines))


def test_ranks_must_be_contiguous(tmp_path: Path) -> None:
    lines = [*_byte_lines(), f"{base64.b64encode(b'ab').decode()} 300"]
    with pytest.raises(TokenizerError, match="ranks must be exactly 0..256"):
        QWenTokenizer.from_file(_write_lines(tmp_path / "qwen.tiktoken", lines))


def test_every_byte_must_have_a_rank(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="single bytes"):
        QWenTokenizer.from_file(_write_lines(tmp_path / "qwen.tiktoken", _byte_lines()[:200]))


def test_git_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "qwen.tiktoken"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2561218\n")
    with pytest.raises(TokenizerError, match="git-lfs pointer"):
        QWenTokenizer.from_file(path)
