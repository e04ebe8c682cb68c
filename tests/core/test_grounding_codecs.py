"""Grounding codecs (``qwenvl_core.grounding``): one pixel representation <-> each family's convention.

Expected strings are computed by hand in the comments (and two come from the official converter's printed
output, QwenLM/Qwen3-VL ``qwen-vl-finetune/tools/process_bbox.ipynb``); the resize is checked against
transformers' own image processor.
"""

from __future__ import annotations

import pytest
from PIL import Image

from qwenvl_core.errors import ConfigError, PromptError
from qwenvl_core.grounding import (
    CODECS,
    GroundingCodec,
    PixelObject,
    PixelPoint,
    ResizeRule,
    codec_for,
    pixel_problems,
)
from qwenvl_core.models.qwen_vl import grounding as v1

FAMILIES = ["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
GRID_FAMILIES = ["qwen-vl", "qwen2-vl", "qwen3-vl"]
POINT_FAMILIES = ["qwen2.5-vl", "qwen3-vl"]
OFFICIAL_RULE = ResizeRule(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 1280, factor=28)  # process_bbox.ipynb
SMALL_MAX = ResizeRule(max_pixels=28 * 28 * 256)  # clamps 1920x1080 by max_pixels
BIG_MIN = ResizeRule(min_pixels=28 * 28 * 256)  # clamps 100x80 by min_pixels
SIZES = [(100, 80), (640, 480), (1920, 1080), (3000, 200)]
CARROTS = PixelObject("bowl of carrots", (146, 137, 615, 415))  # the official notebook's box, image 640x428


# -- the resize Qwen2.5-VL's coordinates depend on ---------------------------------------------------------------

@pytest.mark.parametrize(("rule", "size", "expected"), [
    # 640x480: h = round(480/28 = 17.14) * 28 = 476, w = round(640/28 = 22.86) * 28 = 644; 476 * 644 within budget
    (ResizeRule(), (640, 480), (644, 476)),
    # 3000x200: h = round(7.14) * 28 = 196, w = round(107.14) * 28 = 2996; 587216 px <= 1003520
    (ResizeRule(), (3000, 200), (2996, 196)),
    # 1920x1080, max 1003520: rounded 1932x1092 is over; beta = sqrt(2073600 / 1003520) = 1.43747,
    # h = floor(1080 / 1.43747 / 28 = 26.83) * 28 = 728, w = floor(1920 / 1.43747 / 28 = 47.70) * 28 = 1316
    (ResizeRule(), (1920, 1080), (1316, 728)),
    # 100x80, min 200704: rounded 112x84 = 9408 is under; beta = sqrt(200704 / 8000) = 5.00879,
    # h = ceil(80 * 5.00879 / 28 = 14.31) * 28 = 420, w = ceil(100 * 5.00879 / 28 = 17.89) * 28 = 504
    (BIG_MIN, (100, 80), (504, 420)),
])
def test_resize_hand_computed(rule: ResizeRule, size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rule.resized(size) == expected


@pytest.mark.parametrize("rule", [ResizeRule(), SMALL_MAX, BIG_MIN])
def test_resize_equals_transformers_image_processor(rule: ResizeRule) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)
    assert ResizeRule.from_image_processor(processor) == rule
    for size in [*SIZES, (37, 1999), (29, 29)]:
        out = processor(images=[Image.new("RGB", size)], return_tensors="np")
        _, grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0])
        assert rule.resized(size) == (grid_w * processor.patch_size, grid_h * processor.patch_size), size


def test_resize_rule_rejects_bad_values_and_images() -> None:
    with pytest.raises(ConfigError, match="min_pixels"):
        ResizeRule(min_pixels=0)
    with pytest.raises(ConfigError, match="must not exceed"):
        ResizeRule(min_pixels=10_000, max_pixels=100)
    with pytest.raises(PromptError, match="1x300"):
        ResizeRule().resized((1, 300))  # aspect ratio over 200: the processor refuses it


# -- exact strings per convention -------------------------------------------------------------------------------

def test_official_converter_examples() -> None:
    # process_bbox.ipynb prints [228, 320, 961, 970] for Qwen2-VL and [147, 134, 619, 407] for Qwen2.5-VL.
    # By hand: 146/640*1000 = 228.1, 137/428*1000 = 320.1, 615/640*1000 = 960.9, 415/428*1000 = 969.6;
    # 428x640 resizes to 420x644 (round(15.29) * 28, round(22.86) * 28): 146*644/640 = 146.9, 137*420/428 = 134.4,
    # 615*644/640 = 618.8, 415*420/428 = 407.2.
    size = (640, 428)
    assert codec_for("qwen2-vl").format([CARROTS], size) == (
        "<|object_ref_start|>bowl of carrots<|object_ref_end|><|box_start|>(228,320),(961,970)<|box_end|>")
    assert codec_for("qwen2.5-vl", OFFICIAL_RULE).format([CARROTS], size) == (
        '```json\n[\n\t{"bbox_2d": [147, 134, 619, 407], "label": "bowl of carrots"}\n]\n```')
    assert codec_for("qwen3-vl").format([CARROTS], size) == (
        '```json\n[\n\t{"bbox_2d": [228, 320, 961, 970], "label": "bowl of carrots"}\n]\n```')
    assert codec_for("qwen-vl").format([CARROTS], size) == "<ref>bowl of carrots</ref><box>(228,320),(961,970)</box>"


def test_exact_strings_several_objects_points_and_edges() -> None:
    size = (640, 480)
    objects = [PixelObject("cat", (0, 0, 640, 480)), PixelObject("cat", (320, 240.5, 64, 48)), PixelObject(None, (1, 1, 2, 2))]
    # Whole image: 0 and 1000 on the grid (v1 clamps 1000 to 999). Swapped corners are ordered:
    # (64, 48, 320, 240.5) -> 64/640*1000 = 100, 48/480*1000 = 100, 500, 240.5/480*1000 = 501.04 -> 501.
    # (1, 1, 2, 2) -> 1/640*1000 = 1.56 -> 2, 1/480*1000 = 2.08 -> 2, 3.125 -> 3, 4.17 -> 4.
    assert codec_for("qwen2-vl").format(objects, size) == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>"
        "<|box_start|>(100,100),(500,501)<|box_end|>\n<|box_start|>(2,2),(3,4)<|box_end|>")
    assert codec_for("qwen-vl").format(objects, size) == (
        "<ref>cat</ref><box>(0,0),(999,999)</box><box>(100,100),(500,501)</box>\n<box>(2,2),(3,4)</box>")
    # Qwen2.5-VL, 640x480 -> 644x476 (see test_resize_hand_computed); whole image clips to (643, 475);
    # 64*644/640 = 64.4 -> 64, 48*476/480 = 47.6 -> 48, 320*644/640 = 322, 240.5*476/480 = 238.496 -> 238;
    # 1*644/640 = 1.006 -> 1, 1*476/480 = 0.992 -> 1, 2.0125 -> 2, 1.983 -> 2. The point: 322, 240*476/480 = 238.
    assert codec_for("qwen2.5-vl").format([*objects, PixelPoint("tip", (320, 240))], size) == (
        '```json\n[\n\t{"bbox_2d": [0, 0, 643, 475], "label": "cat"},\n'
        '\t{"bbox_2d": [64, 48, 322, 238], "label": "cat"},\n'
        '\t{"bbox_2d": [1, 1, 2, 2]},\n'
        '\t{"point_2d": [322, 238], "label": "tip"}\n]\n```')
    # Qwen3-VL point (320, 240) -> (500, 500); a label with non-ASCII text is kept as is.
    assert codec_for("qwen3-vl").format([PixelPoint("狗", (320, 240))], size) == (
        '```json\n[\n\t{"point_2d": [500, 500], "label": "狗"}\n]\n```')
    assert codec_for("qwen3-vl").format([], size) == "```json\n[]\n```"
    assert codec_for("qwen3-vl").format_inline([PixelObject("a", (0, 0, 64, 48))], size) == (
        '{"bbox_2d": [0, 0, 100, 100], "label": "a"}')


@pytest.mark.parametrize("family", ["qwen-vl", "qwen2-vl"])
def test_box_only_conventions_refuse_points(family: str) -> None:
    with pytest.raises(PromptError, match="no points"):
        codec_for(family).format([PixelPoint("x", (1, 1))], (10, 10))


@pytest.mark.parametrize("family", FAMILIES)
def test_format_refuses_bad_input(family: str) -> None:
    codec = codec_for(family)
    with pytest.raises(PromptError, match="image size"):
        codec.format([PixelObject("a", (0, 0, 1, 1))], (0, 10))
    if family != "qwen-vl":  # v1's normalize_box is kept as is
        with pytest.raises(PromptError, match="finite"):
            codec.format([PixelObject("a", (0, float("nan"), 1, 1))], (10, 10))


# -- round trips: pixel -> text -> pixel within the grid's quantisation error ----------------------------------

def _bound(family: str, size: tuple[int, int], rule: ResizeRule) -> tuple[float, float]:
    """Half a model unit in pixels: the rounding error of one coordinate, away from the clipped edges."""
    if family == "qwen2.5-vl":
        resized = rule.resized(size)
        return 0.5 * size[0] / resized[0], 0.5 * size[1] / resized[1]
    return 0.5 * size[0] / 1000, 0.5 * size[1] / 1000


ROUND_TRIP_CASES = [(f, s, ResizeRule()) for f in FAMILIES for s in SIZES] + [
    ("qwen2.5-vl", (1920, 1080), SMALL_MAX), ("qwen2.5-vl", (100, 80), BIG_MIN)]


@pytest.mark.parametrize(("family", "size", "rule"), ROUND_TRIP_CASES)
def test_round_trip_boxes(family: str, size: tuple[int, int], rule: ResizeRule) -> None:
    codec = codec_for(family, rule)
    width, height = size
    objects = [PixelObject("the red circle", (0.13 * width, 0.27 * height, 0.81 * width, 0.99 * height)),
               PixelObject("a dog", (0.5 * width + 0.3, 0.001 * height, 0.77 * width, 0.5 * height))]
    parsed = codec.parse(codec.format(objects, size), size)
    bx, by = _bound(family, size, rule)
    assert [o.ref for o in parsed] == ["the red circle", "a dog"]
    for got, want in zip(parsed, objects, strict=True):
        for a, b, tol in zip(got.box, want.box, (bx, by, bx, by), strict=True):
            assert abs(a - b) <= tol + 1e-9


@pytest.mark.parametrize(("family", "size", "rule"), [c for c in ROUND_TRIP_CASES if c[0] in POINT_FAMILIES])
def test_round_trip_points(family: str, size: tuple[int, int], rule: ResizeRule) -> None:
    codec = codec_for(family, rule)
    width, height = size
    point = PixelPoint("tip", (0.37 * width, 0.61 * height))
    [parsed] = codec.parse_points(codec.format([point], size), size)
    bx, by = _bound(family, size, rule)
    assert parsed.ref == "tip"
    assert abs(parsed.point[0] - point.point[0]) <= bx + 1e-9 and abs(parsed.point[1] - point.point[1]) <= by + 1e-9


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_whole_image_edges(size: tuple[int, int]) -> None:
    # The edges are where the conventions differ: 0-1000 grids keep 1000 (exact), v1 clamps to 999 (one unit,
    # w/1000 px), Qwen2.5-VL clamps to w'-1 (one resized pixel, w/w' px).
    width, height = size
    whole = [PixelObject("all", (0, 0, width, height))]
    for family in ("qwen2-vl", "qwen3-vl"):
        assert codec_for(family).parse(codec_for(family).format(whole, size), size)[0].box == (0, 0, width, height)
    [v1_box] = codec_for("qwen-vl").parse(codec_for("qwen-vl").format(whole, size), size)
    assert v1_box.box == pytest.approx((0, 0, width * 0.999, height * 0.999))
    resized = ResizeRule().resized(size)
    [q25] = codec_for("qwen2.5-vl").parse(codec_for("qwen2.5-vl").format(whole, size), size)
    assert q25.box == pytest.approx((0, 0, width - width / resized[0], height - height / resized[1]))


def test_max_pixels_changes_qwen2_5_coordinates_but_not_pixels() -> None:
    size = (1920, 1080)
    obj = [PixelObject("car", (960, 540, 1440, 810))]
    default, small = codec_for("qwen2.5-vl"), codec_for("qwen2.5-vl", SMALL_MAX)
    # 1920x1080 -> 1316x728 by default; with max 200704: beta = sqrt(2073600/200704) = 3.2143,
    # h = floor(1080/3.2143/28 = 12.0) * 28 = 336, w = floor(1920/3.2143/28 = 21.33) * 28 = 588.
    assert SMALL_MAX.resized(size) == (588, 336)
    # 960 * 1316/1920 = 658, 540 * 728/1080 = 364, 1440 * 1316/1920 = 987, 810 * 728/1080 = 546
    assert '"bbox_2d": [658, 364, 987, 546]' in default.format(obj, size)
    # 960 * 588/1920 = 294, 540 * 336/1080 = 168, 1440 * 588/1920 = 441, 810 * 336/1080 = 252
    assert '"bbox_2d": [294, 168, 441, 252]' in small.format(obj, size)
    assert small.parse(small.format(obj, size), size)[0].box == pytest.approx(obj[0].box)


# -- lenient parsing of model output -----------------------------------------------------------------------------

def test_json_parsing_is_lenient() -> None:
    codec, size = codec_for("qwen3-vl"), (1000, 500)  # 1 unit = 1 px horizontally, 0.5 px vertically
    fenced = 'Sure!\n```json\n[\n  {"bbox_2d": [10, 20, 30, 40], "label": "a"}\n]\n```\nAnything else?'
    assert codec.parse(fenced, size) == [PixelObject("a", (10, 10, 30, 20))]
    bare_single = 'The cup is at {"bbox_2d": [30.5, 40, 10, 20], "label": " cup "} in the picture.'
    assert codec.parse(bare_single, size) == [PixelObject("cup", (10, 10, 30.5, 20))]  # swapped, float, stripped
    outside = '[{"bbox_2d": [-5, 900, 1200, 1000]}, {"bbox_2d": [1, 2, 3]}, {"bbox_2d": "x"}, {"label": "no box"}, ' \
              '{"bbox_2d": [true, 1, 2, 3]}, {"bbox_2d": [[100, 100, 200, 200]], "label": 7}]'
    assert codec.parse(outside, size) == [PixelObject(None, (0, 450, 1000, 500)), PixelObject(None, (100, 50, 200, 100))]
    truncated = '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "x"},\n\t{"bbox_2d": [5, 6, 7, 8], "lab'
    assert codec.parse(truncated, size) == [PixelObject("x", (1, 1, 3, 2))]
    nested = '{"objects": [{"bbox_2d": [0, 0, 10, 10], "label": "inner"}]}'
    assert codec.parse(nested, size) == [PixelObject("inner", (0, 0, 10, 5))]
    mixed = '[{"point_2d": [500, 500], "label": "p"}, {"bbox_2d": [0, 0, 1, 1]}, {"point_2d": [[10, 20]]}]'
    assert codec.parse(mixed, size) == [PixelObject(None, (0, 0, 1, 0.5))]
    assert codec.parse_points(mixed, size) == [PixelPoint("p", (500, 250)), PixelPoint(None, (10, 10))]


def test_qwen2_5_reads_cookbook_xml_points_in_resized_pixels() -> None:
    codec, size = codec_for("qwen2.5-vl"), (640, 480)  # resized to 644x476
    text = 'Here: <points x1="322" y1="238" x2="0" y2="476" alt="rolling pin">rolling pin</points>'
    points = codec.parse_points(text, size)
    assert [p.ref for p in points] == ["rolling pin", "rolling pin"]
    assert points[0].point == pytest.approx((322 * 640 / 644, 238 * 480 / 476))
    assert points[1].point == pytest.approx((0, 480))  # 476 * 480/476 = 480: the bottom edge


def test_qwen2_vl_parsing_is_lenient() -> None:
    codec, size = codec_for("qwen2-vl"), (2000, 1000)
    text = ("In the image,<|object_ref_start|>a woman<|object_ref_end|><|box_start|>(462,371),(709,785)<|box_end|> "
            "sits with<|object_ref_start|> her dog<|object_ref_end|><|box_start|>(521, 1050),(10,20)<|box_end|>"
            "<|box_start|>(1,2),(3<|box_end|> and <|box_start|>(0,0),(1000,1000)<|box_end|>")
    assert codec.parse(text, size) == [
        PixelObject("a woman", (924, 371, 1418, 785)),
        PixelObject("her dog", (20, 20, 1042, 1000)),  # swapped corners ordered, 1050 clipped to the edge
        PixelObject(None, (0, 0, 2000, 1000)),  # after other text: no phrase
    ]
    assert codec.strip(text) == "In the image,a woman sits with her dog and "


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("junk", ["", "no boxes here", "[[[[[[", '{"bbox_2d": [1, 2', "{" * 3000 + '"bbox_2d"',
                                  '{"bbox_2d": [NaN, 1, 2, 3]}', "<|box_start|><|box_end|><box></box>",
                                  '<points x1="a" y1="1">', '{"point_2d": [Infinity, 2]}', "```json\n]\n```"])
def test_parse_never_raises_on_junk(family: str, junk: str) -> None:
    codec = codec_for(family)
    for size in [(100, 100), (0, 0), (1, 300)]:
        assert codec.parse(junk, size) == []
        assert codec.parse_points(junk, size) == []
    assert isinstance(codec.strip(junk), str)


# -- v1 is a wrapper: byte-identical to today's v1 functions ----------------------------------------------------

@pytest.mark.parametrize("size", [*SIZES, (37, 1999), (448, 448)])
def test_v1_codec_is_byte_identical_to_v1_functions(size: tuple[int, int]) -> None:
    codec, (width, height) = codec_for("qwen-vl"), size
    for box in [(0.13 * width, 0.27 * height, 0.81 * width, 0.99 * height), (-10, 5, width + 3, height),
                (width * 0.7, height * 0.9, width * 0.1, height * 0.2)]:
        expected = v1.format_ref("the red circle", v1.normalize_box(box, width, height))
        assert codec.format([PixelObject("the red circle", box)], size) == expected
        assert codec.format([PixelObject(None, box)], size) == v1.format_box(v1.normalize_box(box, width, height))
        text = f"Look: {expected} and <box>(1,2),(3,4)</box><quad>(1,1),(2,2),(3,3),(4,4)</quad>"
        assert codec.parse(text, size) == v1.parse_boxes_pixels(text, width, height)
        assert codec.strip(text) == v1.strip_grounding(text)
    bad = "<ref>x<box>(1,2),(3,4)</box> <box>(9,9),(1000,2)</box>"
    assert codec.validate(bad) == v1.validate_box_markup(bad) != []
    assert codec.from_v1_markup(bad, size) == bad


# -- the platform's v1 markup rewritten per family ---------------------------------------------------------------

def test_v1_markup_rewritten_per_family() -> None:
    size = (640, 480)
    answer = "<ref>the dog</ref><box>(100,200),(300,400)</box>"
    # The grids keep the numbers: 100/1000*640 = 64 px -> 64/640*1000 = 100, etc.
    assert codec_for("qwen2-vl").from_v1_markup(answer, size) == (
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>")
    assert codec_for("qwen3-vl").from_v1_markup(answer, size) == (
        '```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], "label": "the dog"}\n]\n```')
    # Qwen2.5-VL: pixels (64, 96, 192, 192) on 640x480 -> 644x476: 64.4 -> 64, 95.2 -> 95, 193.2 -> 193, 190.4 -> 190
    assert codec_for("qwen2.5-vl").from_v1_markup(answer, size) == (
        '```json\n[\n\t{"bbox_2d": [64, 95, 193, 190], "label": "the dog"}\n]\n```')
    assert codec_for("qwen-vl").from_v1_markup(answer, size) == answer


def test_v1_markup_in_prose_and_prompts() -> None:
    size = (1000, 1000)
    caption = "I see <ref>two cats</ref><box>(0,0),(500,500)</box> <box>(500,500),(999,999)</box> here."
    assert codec_for("qwen3-vl").from_v1_markup(caption, size) == (
        'I see [{"bbox_2d": [0, 0, 500, 500], "label": "two cats"}, '
        '{"bbox_2d": [500, 500, 999, 999], "label": "two cats"}] here.')
    assert codec_for("qwen2-vl").from_v1_markup(caption, size) == (
        "I see <|object_ref_start|>two cats<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
        "<|box_start|>(500,500),(999,999)<|box_end|> here.")
    prompt = "Where is <ref>the dog</ref>? Not <box>(1,2),(3</box>."
    assert codec_for("qwen2-vl").from_v1_markup(prompt, size) == (
        "Where is <|object_ref_start|>the dog<|object_ref_end|>? Not <box>(1,2),(3</box>.")  # malformed: kept
    assert codec_for("qwen3-vl").from_v1_markup(prompt, size) == "Where is the dog? Not <box>(1,2),(3</box>."


@pytest.mark.parametrize("family", FAMILIES)
def test_rewritten_v1_markup_parses_back_to_the_same_pixels(family: str) -> None:
    size = (1920, 1080)
    text = "<ref>a</ref><box>(10,20),(300,400)</box>\n<ref>b</ref><box>(500,500),(999,999)</box>"
    codec = codec_for(family)
    expected = v1.parse_boxes_pixels(text, *size)
    parsed = codec.parse(codec.from_v1_markup(text, size), size)
    bx, by = _bound(family, size, ResizeRule())
    assert [o.ref for o in parsed] == ["a", "b"]
    for got, want in zip(parsed, expected, strict=True):
        assert all(abs(a - b) <= t + 1e-9 for a, b, t in zip(got.box, want.box, (bx, by, bx, by), strict=True))


# -- strip and validate ------------------------------------------------------------------------------------------

def test_json_strip_replaces_blocks_by_labels() -> None:
    codec = codec_for("qwen3-vl")
    text = 'Found:\n```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n\t{"point_2d": [5, 6], "label": "b"},\n]\n```\n' \
           'and {"bbox_2d": [0, 0, 1, 1]} too'
    assert codec.strip(text) == "Found:\na, b\nand  too"


def test_validate_tag_markup_with_positions() -> None:
    codec = codec_for("qwen2-vl")
    assert codec.validate("<|object_ref_start|>a<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>") == []
    problems = codec.validate("<|box_start|>(10,20),(5,1016)<|box_end|> <|object_ref_start|>x <|box_start|>(1,2)"
                              "<|box_end|> <|box_end|>")
    assert problems == [
        # '<|box_start|>' 13 chars + '(10,20),(5,1016)' 16 + '<|box_end|>' 11 + ' ' = 41; '<|object_ref_start|>'
        # 20 + 'x ' = 63; 63 + 13 + '(1,2)' 5 + 11 + ' ' = 93.
        "'<|box_start|>' at char 63 opened before '<|object_ref_start|>' was closed",
        "'<|box_end|>' at char 93 has no matching opening token",
        "'<|box_start|>(10,20),(5,1016)<|box_end|>' at char 0: coordinate 1016 outside [0, 1000] (qwen2-vl uses a "
        "relative 0-1000 grid, not pixels)",
        "'<|box_start|>(10,20),(5,1016)<|box_end|>' at char 0: x2 < x1 or y2 < y1",
        "'<|box_start|>(1,2)<|box_end|>' at char 63: malformed coordinates, expected (x1,y1),(x2,y2) with integers",
    ]
    # The platform's v1 markup in the same text is checked too (it is what gets rewritten).
    assert codec.validate("<box>(1,2),(3,4)") == ["'<box>' at char 0 is never closed"]


def test_validate_json_markup_names_the_convention() -> None:
    text = '```json\n[{"bbox_2d": [135, 114, 1016, 672], "label": "house"}, {"bbox_2d": [1, 2.5, 3], "label": 1}]\n' \
           '```\nand {"bbox_2d": [1, 2, 3, 4 oops'
    problems = codec_for("qwen3-vl").validate(text)
    # '```json\n[' is 9 chars; the first object is 52 chars (9..61), ', ' -> the second starts at 63 and is 36
    # chars (..99); ']\n```\nand ' is 10 more -> '{' at 109, its key at 110.
    assert problems == [
        "'bbox_2d' at char 110 is not in a well-formed JSON object",
        "object at char 9: 'bbox_2d' x=1016 exceeds 1000: qwen3-vl uses a relative 0-1000 grid (absolute pixels of "
        "the resized image are Qwen2.5-VL's convention)",
        "object at char 63: 'label' must be a string, got 1",
        "object at char 63: 'bbox_2d' must be a list of 4 numbers, got [1, 2.5, 3]",
    ]
    # Qwen2.5-VL: the same 1016 fits a 640x480 image only if it is within the resized 644x476 frame.
    q25 = codec_for("qwen2.5-vl")
    assert q25.validate('[{"bbox_2d": [135, 114, 1016, 672]}]') == []  # size unknown: only signs and order
    assert q25.validate('[{"bbox_2d": [135, 114, 1016, 472]}]', (640, 480)) == [
        "object at char 1: 'bbox_2d' x=1016 exceeds 643: qwen2.5-vl uses absolute coordinates of the 644x476 image "
        "the model sees after resizing (min_pixels=3136, max_pixels=1003520)"]
    assert q25.validate('{"point_2d": [-1, 3.5]}', (640, 480)) == [
        "object at char 0: 'point_2d' value 3.5 is not an integer", "object at char 0: 'point_2d' value -1 is negative"]
    assert q25.validate('{"point_2d": [1, 3]}', (1, 300)) == ["image 1x300 cannot be resized for the model: "
                                                             "absolute aspect ratio must be smaller than 200, got 300.0"]


def test_pixel_problems_for_author_boxes() -> None:
    objects = [PixelObject("ok", (0, 0, 640, 480)), PixelObject("out", (-1, 0, 700, 10)),
               PixelObject(None, (10, 10, 5, 5)), PixelPoint("p", (float("inf"), 1)), PixelObject("short", (1, 2, 3))]
    assert pixel_problems(objects, (640, 480)) == [
        "object 1 ('out'): x=-1 is outside the image (0..640 px)",
        "object 1 ('out'): x=700 is outside the image (0..640 px)",
        "object 2: box [10, 10, 5, 5] has x2 < x1 or y2 < y1",
        "object 3 ('p'): coordinates must be finite numbers, got [inf, 1]",
        "object 4 ('short'): expected 4 box coordinates, got 3",
    ]


# -- the family table --------------------------------------------------------------------------------------------

def test_codec_table() -> None:
    assert sorted(CODECS) == sorted(FAMILIES)
    for family in FAMILIES:
        codec = codec_for(family)
        assert isinstance(codec, GroundingCodec) and codec.name == family
    with pytest.raises(ConfigError, match="qwen4-vl.*known: qwen-vl, qwen2-vl, qwen2.5-vl, qwen3-vl"):
        codec_for("qwen4-vl")
