"""Grounding markup: format, tolerant parse, pixel conversion, strip, validation, drawing."""

from __future__ import annotations

import pytest
from PIL import Image

from qwenvl_core.errors import PromptError
from qwenvl_core.models.qwen_vl.grounding import (
    Box,
    GroundedObject,
    draw_boxes,
    format_box,
    format_ref,
    normalize_box,
    parse_boxes_pixels,
    parse_grounding,
    strip_grounding,
    to_pixels,
    validate_box_markup,
)


def test_format() -> None:
    box = Box(10, 20, 300, 400)
    assert format_box(box) == "<box>(10,20),(300,400)</box>"
    assert format_ref("the red circle", box) == "<ref>the red circle</ref><box>(10,20),(300,400)</box>"


@pytest.mark.parametrize(
    "args", [(-1, 0, 5, 5), (0, 0, 1000, 5), (10, 0, 5, 5), (0, 9, 5, 5), (0.5, 0, 5, 5)]
)
def test_box_rejects_invalid(args: tuple[float, float, float, float]) -> None:
    with pytest.raises(PromptError):
        Box(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(640, 480), (37, 1999), (448, 448)])
def test_pixel_round_trip(size: tuple[int, int]) -> None:
    width, height = size
    pixel_box = (0.13 * width, 0.27 * height, 0.81 * width, 0.99 * height)
    text = "Here: " + format_ref("dog", normalize_box(pixel_box, width, height)) + " done."
    [obj] = parse_boxes_pixels(text, width, height)
    assert obj.ref == "dog"
    tolerance = (0.5 / 1000 * width, 0.5 / 1000 * height) * 2
    assert all(abs(a - b) <= t + 1e-9 for a, b, t in zip(obj.box, pixel_box, tolerance, strict=True))


def test_normalize_clamps_and_orders() -> None:
    assert normalize_box((-10, 50, 700, 2000), 640, 1000) == Box(0, 50, 999, 999)
    assert normalize_box((100, 100, 50, 20), 100, 100) == Box(500, 200, 999, 999)
    assert to_pixels(Box(0, 500, 250, 999), 200, 100) == pytest.approx((0.0, 50.0, 50.0, 99.9))
    with pytest.raises(PromptError, match="positive"):
        normalize_box((0, 0, 1, 1), 0, 10)


def test_parse_several_boxes_per_ref_and_missing_ref() -> None:
    text = (
        "<ref>two cars</ref><box>(1,2),(3,4)</box> <box>(5,6),(7,8)</box> and also "
        "<box>(9,9),(10,10)</box><ref>a dog</ref><box>(100,100),(200,200)</box>"
    )
    assert parse_grounding(text) == [
        GroundedObject("two cars", Box(1, 2, 3, 4)),
        GroundedObject("two cars", Box(5, 6, 7, 8)),
        GroundedObject(None, Box(9, 9, 10, 10)),
        GroundedObject("a dog", Box(100, 100, 200, 200)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "<box>(1,2)</box>",
        "<box>garbage</box>",
        "<box>(1,2),(3,x)</box>",
        "<box>(1,2),(3,4)",
        "<ref>x</ref><box>(-5,2),(3,4)</box>",
        "<box>(1,2),(3,4000)</box>",
        "<ref>unclosed <box>",
        "",
    ],
)
def test_parse_skips_garbage(text: str) -> None:
    assert parse_grounding(text) == []


def test_parse_is_lenient_with_model_slips() -> None:
    assert parse_grounding("<box>( 30 , 40 ),( 10, 1000 )</box>") == [
        GroundedObject(None, Box(10, 40, 30, 999))
    ]
    assert parse_grounding("<ref>cat<box>(1,2),(3,4)</box>") == [GroundedObject(None, Box(1, 2, 3, 4))]


def test_strip_grounding() -> None:
    text = "A <ref>dog</ref><box>(1,2),(3,4)</box> near <ref>a tree</ref><box>(5,6),(7,8)</box>."
    assert strip_grounding(text) == "A dog near a tree."
    assert strip_grounding("text <quad>(1,2),(3,4),(5,6),(7,8)</quad>ok") == "text ok"
    assert strip_grounding("没有框的中文") == "没有框的中文"


def test_validate_box_markup() -> None:
    assert validate_box_markup("<ref>狗</ref><box>(0,0),(999,999)</box> plain text") == []
    problems = validate_box_markup(
        "<box>(1,2),(3)</box> <box>(10,0),(5,1000)</box> <ref>open <box>(1,1),(2,2)</box> </box>"
    )
    joined = "\n".join(problems)
    assert "malformed coordinates" in joined
    assert "coordinate 1000 outside [0, 1000)" in joined
    assert "x2 (5) < x1 (10)" in joined
    assert "'<box>' at char" in joined and "opened before '<ref>' was closed" in joined
    assert "has no matching '<box>'" in joined


def test_validate_unclosed_tag() -> None:
    assert validate_box_markup("<ref>x</ref><box>(1,2),(3,4)") == ["'<box>' at char 12 is never closed"]


def test_draw_boxes() -> None:
    image = Image.new("L", (200, 100), 0)
    out = draw_boxes(
        image, [GroundedObject("dog", Box(100, 100, 900, 900)), GroundedObject(None, Box(0, 0, 5, 5))]
    )
    assert out.mode == "RGB" and out.size == (200, 100)
    assert out.getpixel((180, 50)) != (0, 0, 0)  # right edge of the first box
    assert out.getpixel((100, 60)) == (0, 0, 0)  # inside, away from the label
    assert image.getpixel((180, 50)) == 0  # the input is not modified
