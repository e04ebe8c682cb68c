"""Image loading and preprocessing, ChatML layout, and QwenVLProcessor end to end on a tiny tokenizer."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.errors import ConfigError, ImageError, PromptError
from qwenvl_core.images import ImageLimits, load_image
from qwenvl_core.models.qwen_vl.chat import (
    encode_conversation,
    render_chatml,
    split_image_markup,
)
from qwenvl_core.models.qwen_vl.images import CLIP_MEAN, CLIP_STD, preprocess_image
from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor
from qwenvl_core.models.qwen_vl.tiny_tokenizer import train_tiny_tokenizer
from qwenvl_core.models.qwen_vl.tokenizer import QWenTokenizer

N_QUERIES = 4


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _noise(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> QWenTokenizer:
    return QWenTokenizer.from_file(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "qwen.tiktoken"))


# -- image loading -----------------------------------------------------------------------------------------------


def test_load_from_path_bytes_pil_and_data_url(tmp_path: Path) -> None:
    image = _noise()
    data = _png(image)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [tmp_path / "imgs" / "a.png", str(tmp_path / "imgs" / "a.png"), data, data_url, image]
    for source in sources:
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (64, 48)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))
    assert load_image("imgs/a.png", base_dir=tmp_path).size == (64, 48)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "1"])
def test_modes_convert_to_rgb(mode: str) -> None:
    image = _noise(mode=mode)
    source = image if mode == "CMYK" else _png(image)
    assert load_image(source).mode == "RGB"


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    loaded = load_image(_png(Image.fromarray(arr)))
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found") as err:
        load_image("nope.png", base_dir=tmp_path)
    assert str(tmp_path / "nope.png") in str(err.value)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(path)
    with pytest.raises(ImageError, match=r"bytes \(5 bytes\): not an image"):
        load_image(b"hello")
    with pytest.raises(ImageError, match="data URL.*not an image"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="remote URLs"):
        load_image("https://example.com/cat.png")


def test_truncated_file_fails(tmp_path: Path) -> None:
    data = _png(_noise(256, 256))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match=r"cut\.png: truncated or corrupt"):
        load_image(path)


def test_corrupt_data_fails() -> None:
    data = bytearray(_png(_noise(128, 128)))
    data[200:400] = bytes(200)
    with pytest.raises(ImageError, match=r"bytes \(\d+ bytes\): truncated or corrupt"):
        load_image(bytes(data))
    jpeg = io.BytesIO()
    _noise(128, 128).save(jpeg, format="JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(jpeg.getvalue()[:600])


def test_header_claiming_huge_dimensions_is_refused_before_decoding() -> None:
    with pytest.raises(ImageError, match=r"too many pixels \(8000x8000 = 64000000 > limit 50000000\)"):
        load_image(_png_header_only(8000, 8000))
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(_png_header_only(100_000, 100_000))  # beyond Pillow's own bomb limit too


def test_small_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png(_noise(20, 20)))
    with pytest.raises(ImageError, match=r"a\.png: too many pixels \(20x20 = 400 > limit 100\)"):
        load_image(path, limits=ImageLimits(max_pixels=100))
    with pytest.raises(ImageError, match=r"PIL image \(RGB 20x20\): too many pixels"):
        load_image(_noise(20, 20), limits=ImageLimits(max_pixels=100))


def test_too_many_bytes(tmp_path: Path) -> None:
    data = _png(_noise())
    limits = ImageLimits(max_bytes=100)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"big\.png: too many bytes"):
        load_image(path, limits=limits)
    with pytest.raises(ImageError, match="bytes .*too many bytes"):
        load_image(data, limits=limits)
    with pytest.raises(ImageError, match="data URL .*too many bytes"):
        load_image("data:image/png;base64," + base64.b64encode(data).decode(), limits=limits)


def test_preprocess_solid_colour() -> None:
    rgb = (255, 0, 128)
    pixels = preprocess_image(Image.new("RGB", (37, 23), rgb), 28)
    assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.float32
    for c in range(3):
        expected = (rgb[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(pixels[c], torch.full((28, 28), expected), atol=1e-5)


def test_preprocess_matches_pillow_bicubic() -> None:
    image = _noise(50, 30)
    resized = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (resized - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    actual = preprocess_image(image, 16).permute(1, 2, 0).numpy()
    assert np.allclose(actual, expected, atol=1e-5)


# -- ChatML ------------------------------------------------------------------------------------------------------


def _two_image_conversation() -> list[Message]:
    return [
        Message("user", [ImagePart("imgs/a.png"), TextPart("What colour is the circle?")]),
        text_message("assistant", "It is red."),
        Message("user", [ImagePart(Path("imgs/b.png")), TextPart("Where is the square?")]),
        text_message("assistant", "<ref>the square</ref><box>(100,200),(300,400)</box>"),
    ]


def test_render_chatml_golden() -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img>imgs/a.png</img>\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
        "<|im_start|>user\nPicture 2: <img>imgs/b.png</img>\nWhere is the square?<|im_end|>\n"
        "<|im_start|>assistant\n<ref>the square</ref><box>(100,200),(300,400)</box><|im_end|>\n"
    )
    assert render_chatml(_two_image_conversation()) == expected
    prompt = render_chatml(_two_image_conversation()[:3], add_generation_prompt=True)
    assert prompt.endswith("Where is the square?<|im_end|>\n<|im_start|>assistant\n")


def test_render_custom_system_and_non_path_images() -> None:
    messages = [
        text_message("system", "你是一个助手。"),
        Message("user", [TextPart("看："), ImagePart(b"\x89PNG"), ImagePart("data:image/png;base64,AAAA")]),
    ]
    assert render_chatml(messages, system_prompt="ignored") == (
        "<|im_start|>system\n你是一个助手。<|im_end|>\n"
        "<|im_start|>user\n看：Picture 1: <img>image</img>\nPicture 2: <img>image</img>\n<|im_end|>\n"
    )


def test_encode_conversation_layout(tok: QWenTokenizer) -> None:
    enc = encode_conversation(tok, _two_image_conversation(), N_QUERIES)
    nl = tok.encode("\n")
    assert [t.role for t in enc.turns] == ["system", "user", "assistant", "user", "assistant"]
    for turn in enc.turns:
        assert turn.header_ids == [tok.im_start_id] + tok.encode(turn.role) + nl
        assert turn.footer_ids == [tok.im_end_id] + nl
    assert enc.turns[0].content_ids == tok.encode("You are a helpful assistant.")
    span = tok.image_span(N_QUERIES)
    assert enc.turns[1].content_ids == tok.encode("Picture 1: ") + span + tok.encode(
        "\nWhat colour is the circle?"
    )
    assert enc.turns[3].content_ids == tok.encode("Picture 2: ") + span + tok.encode("\nWhere is the square?")
    assert enc.turns[4].content_ids[0] == tok.ref_start_id
    assert enc.input_ids == [i for t in enc.turns for i in t.ids]
    assert enc.input_ids.count(tok.img_start_id) == 2
    assert enc.input_ids.count(tok.img_pad_id) == 2 * N_QUERIES
    assert [p.source for p in enc.images] == ["imgs/a.png", Path("imgs/b.png")]
    assert enc.generation_ids == []


def test_text_only_matches_official_piecewise_tokenisation(tok: QWenTokenizer) -> None:
    messages = [text_message("user", "图片里有一个红色的圆形。"), text_message("assistant", "好的")]
    enc = encode_conversation(tok, messages, N_QUERIES, add_generation_prompt=True)

    def turn(role: str, content: str) -> list[int]:
        return (
            [tok.im_start_id]
            + tok.encode(role)
            + tok.encode("\n")
            + tok.encode(content)
            + [tok.im_end_id]
            + tok.encode("\n")
        )

    expected = (
        turn("system", "You are a helpful assistant.")
        + turn("user", messages[0].text)
        + turn("assistant", "好的")
    )
    expected += [tok.im_start_id] + tok.encode("assistant") + tok.encode("\n")
    assert enc.input_ids == expected
    assert tok.decode(enc.turns[1].content_ids) == "图片里有一个红色的圆形。"


def test_trainable_flag_is_carried(tok: QWenTokenizer) -> None:
    messages = [text_message("user", "hi"), Message("assistant", [TextPart("skip")], trainable=False)]
    assert [t.trainable for t in encode_conversation(tok, messages, N_QUERIES).turns] == [True, True, False]


def test_split_image_markup_round_trip() -> None:
    value = "Picture 1: <img>a.jpg</img>\nPicture 2: <img>dir/b c.jpg</img>\nCompare them."
    parts = split_image_markup(value)
    assert parts == [ImagePart("a.jpg"), ImagePart("dir/b c.jpg"), TextPart("Compare them.")]
    rendered = render_chatml([Message("user", parts)])
    assert f"<|im_start|>user\n{value}<|im_end|>\n" in rendered
    assert split_image_markup("Picture 3:<img>x.png</img>\nhi") == [ImagePart("x.png"), TextPart("hi")]
    assert split_image_markup("no images") == [TextPart("no images")]


@pytest.mark.parametrize("value", ["<img>a.jpg", "a.jpg</img>", "<img></img>", "<img>a<imgpad></img>"])
def test_split_image_markup_malformed(value: str) -> None:
    with pytest.raises(PromptError):
        split_image_markup(value)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "empty"),
        ([text_message("user", "a"), text_message("system", "s")], "only the first"),
        ([Message("human", [TextPart("a")])], "unknown role 'human'"),  # type: ignore[arg-type]
        ([text_message("system", "s")], "no user or assistant"),
        ([text_message("user", "look <img>a.png</img>")], "image markup"),
    ],
)
def test_prompt_errors(tok: QWenTokenizer, messages: list[Message], message: str) -> None:
    with pytest.raises(PromptError, match=message):
        encode_conversation(tok, messages, N_QUERIES)


# -- processor ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    train_tiny_tokenizer(tmp_path / "qwen.tiktoken")
    config = {
        "vocab_size": 1280,
        "visual": {"image_size": 112, "n_queries": 16, "image_start_id": 1024 + 214},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (20, 40), (0, 0, 255)).save(tmp_path / "imgs" / "blue.png")
    return tmp_path


def test_processor_end_to_end(model_dir: Path) -> None:
    proc = QwenVLProcessor.from_dir(model_dir)
    assert (proc.image_size, proc.n_queries, proc.tokenizer.img_start_id) == (112, 16, 1238)
    messages = [
        Message("user", split_image_markup("Picture 1: <img>imgs/red.png</img>\nWhat colour?")),
        text_message("assistant", "red"),
        Message("user", [ImagePart("imgs/blue.png"), TextPart("And this?")]),
    ]
    prompt = proc.encode_chat(messages, base_dir=model_dir)
    tok = proc.tokenizer
    assert prompt.input_ids.count(tok.img_start_id) == 2
    assert prompt.input_ids.count(tok.img_pad_id) == 32
    assert prompt.input_ids[-3:] == [tok.im_start_id, *tok.encode("assistant"), *tok.encode("\n")][-3:]
    assert prompt.pixel_values is not None and prompt.pixel_values.shape == (2, 3, 112, 112)
    red = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert torch.allclose(prompt.pixel_values[0, 0], torch.full((112, 112), red), atol=1e-5)
    blue = (1 - CLIP_MEAN[2]) / CLIP_STD[2]
    assert torch.allclose(prompt.pixel_values[1, 2], torch.full((112, 112), blue), atol=1e-5)
    assert proc.pixel_values([]) is None
    assert proc.encode_chat([text_message("user", "hi")]).pixel_values is None


def test_processor_parse_boxes(model_dir: Path) -> None:
    proc = QwenVLProcessor.from_dir(model_dir)
    [obj] = proc.parse_boxes("<ref>the red one</ref><box>(0,0),(500,250)</box>", Image.new("RGB", (640, 480)))
    assert obj.ref == "the red one" and obj.box == (0.0, 0.0, 320.0, 120.0)
    assert proc.decode(proc.tokenizer.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_processor_image_errors_name_the_file(model_dir: Path) -> None:
    proc = QwenVLProcessor.from_dir(model_dir)
    with pytest.raises(ImageError, match="missing.png: not found"):
        proc.encode_chat([Message("user", [ImagePart("missing.png")])], base_dir=model_dir)


def test_processor_image_start_id_mismatch(model_dir: Path) -> None:
    (model_dir / "config.json").write_text(
        json.dumps({"visual": {"image_size": 112, "image_start_id": 151857}})
    )
    with pytest.raises(ConfigError, match=r"config\.json.*151857.*qwen\.tiktoken.*1238"):
        QwenVLProcessor.from_dir(model_dir)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"visual": {"image_start_id": 1238}}, "visual.image_size must be a positive integer"),
        ({"visual": {"image_size": 112, "n_queries": 0, "image_start_id": 1238}}, "visual.n_queries"),
        ({}, "no 'visual' object"),
        ({"vocab_size": 1000, "visual": {"image_size": 112, "image_start_id": 1238}}, "vocab_size 1000"),
    ],
)
def test_processor_config_errors(model_dir: Path, config: dict[str, object], message: str) -> None:
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        QwenVLProcessor.from_dir(model_dir)


def test_processor_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json not found"):
        QwenVLProcessor.from_dir(tmp_path)


def test_processor_default_n_queries(model_dir: Path) -> None:
    (model_dir / "config.json").write_text(
        json.dumps({"visual": {"image_size": 112, "image_start_id": 1238}})
    )
    assert QwenVLProcessor.from_dir(model_dir).n_queries == 256


@pytest.mark.parametrize("slice_chars", [4, 16, 1 << 20])
def test_data_url_payloads_decode_in_slices_exactly_as_base64(monkeypatch: pytest.MonkeyPatch,
                                                              slice_chars: int) -> None:
    """Slice-wise decoding (the GIL is released between slices) equals one strict base64 decode; malformed
    payloads (bad characters, padding inside, wrong length) are refused, never decoded differently."""
    import binascii
    import os
    import random

    from qwenvl_core import images

    monkeypatch.setattr(images, "_SLICE", slice_chars)
    rng = random.Random(slice_chars)
    for _ in range(500):
        raw = os.urandom(rng.randrange(0, 80))
        text = base64.b64encode(raw)
        assert images._b64decode_in_slices(bytearray(text)) == raw
        wrapped = "\n".join(text[i:i + 7].decode() for i in range(0, len(text), 7))
        assert images._b64decode_in_slices(images._base64_text("x," + wrapped, 2)) == raw
    for bad in (b"QUJD!A==", b"QQ==QUJD", b"QUJDR", b"QUJD" * 8 + b"=" + b"QUJ"):
        with pytest.raises((binascii.Error, ValueError)):
            images._b64decode_in_slices(bytearray(bad))


def test_decoded_answers_keep_grounding_markup_and_drop_other_specials(tok: QWenTokenizer) -> None:
    """Evaluation parses boxes from ``processor.decode`` (as serving does): dropping every special id lost the
    ``<ref>``/``<box>`` tags, so grounding accuracy could never count a match."""
    from qwenvl_core.models.qwen_vl.grounding import parse_grounding

    answer = "<ref>the red circle</ref><box>(100,200),(300,400)</box>"
    ids = tok.encode_content(answer) + [tok.im_end_id, tok.eod_id, tok.vocab_size + 5]
    text = tok.decode_answer(ids)
    assert text == answer
    found = parse_grounding(text)
    assert [(o.ref, o.box) for o in found] == [(o.ref, o.box) for o in parse_grounding(answer)] and found
