"""The family processor interface: callers import no v1 internals, v1's processor implements the protocol,
``VisionInputs`` concatenate and move as the forward contract needs, and v1 encoding is what it was (ids, labels
and pixels recomputed here from the public v1 functions, never through the data pipeline)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.data import IGNORE_INDEX, Collator, Sample, encode_sample, tokenize_sample
from qwenvl_core.errors import QwenVLError
from qwenvl_core.images import load_image
from qwenvl_core.models.processing import FamilyProcessor, VisionInputs
from qwenvl_core.models.qwen_vl.chat import encode_conversation
from qwenvl_core.models.qwen_vl.images import preprocess_image
from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor
from qwenvl_core.models.registry import get_family
from qwenvl_core.training.evaluate import task_items

ROOT = Path(__file__).resolve().parents[2]
V1 = "qwenvl_core.models.qwen_vl"
# Code that must reach the model only through the family interfaces (ModelFamily, FamilyProcessor).
SCANNED = ("qwenvl_core/data", "qwenvl_core/training", "qwenvl_core/serving", "qwenvl_core/generation.py",
           "service", "workflows", "qwenvl_cli")
# The only imports of v1 internals left there, each with its reason. Keep it short: an entry that is no longer
# needed fails the test too.
ALLOWED = {
    # v1 grounding markup, until the grounding codecs (qwenvl_core.grounding) are wired into these callers:
    ("qwenvl_core/data/checks.py", f"{V1}.grounding"),  # <ref>/<box> checks of training text
    ("qwenvl_core/data/synth.py", f"{V1}.grounding"),  # the synthetic data's grounding answers
    ("qwenvl_cli/chat.py", f"{V1}.grounding"),  # drawing the boxes of a reply
    # The Qwen conversation *dataset* format's "Picture k: <img>path</img>" markup (one format for every family):
    ("qwenvl_core/data/formats.py", f"{V1}.chat"),
}
_MODULE_PATH = re.compile(r"qwenvl_core\.models\.qwen_vl(\.\w+)*(:\w+)?")


def _v1_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a v1 module in ``path``, dotted-path strings (importlib) included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(V1)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(V1):
                found.append((node.lineno, node.module))
            elif node.module == "qwenvl_core.models" and any(a.name == "qwen_vl" for a in node.names):
                found.append((node.lineno, V1))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.fullmatch(node.value):
            found.append((node.lineno, node.value.split(":")[0]))
    return found


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_callers_import_no_v1_internals_beyond_the_allow_list() -> None:
    files = _scanned_files()
    assert len(files) > 30 and ROOT / "qwenvl_core/data/encode.py" in files
    used: set[tuple[str, str]] = set()
    offending: list[str] = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, module in _v1_imports(path):
            key = (rel, ".".join(module.split(".")[:4]))
            used.add(key)
            if key not in ALLOWED:
                offending.append(f"{rel}:{line}: {module}")
    assert not offending, "use the FamilyProcessor / ModelFamily interfaces instead of v1 modules:\n" + "\n".join(
        offending)
    assert not ALLOWED - used, f"allow-list entries no longer needed (remove them): {sorted(ALLOWED - used)}"


def test_the_import_check_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import qwenvl_core.models.qwen_vl.tokenizer\n"
        "from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor\n"
        "from qwenvl_core.models import qwen_vl\n"
        "def f():\n"
        "    from qwenvl_core.models.qwen_vl import chat\n"
        "    return 'qwenvl_core.models.qwen_vl.family:QwenVLFamily', 'see qwenvl_core.models.qwen_vl for v1'\n"
        "from qwenvl_core.models.processing import FamilyProcessor\n",
        encoding="utf-8")
    assert _v1_imports(source) == [(1, f"{V1}.tokenizer"), (2, f"{V1}.processor"), (3, V1), (5, V1),
                                   (6, f"{V1}.family")]


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> QwenVLProcessor:
    return QwenVLProcessor.from_dir(tiny_model_dir)


def test_v1_processor_is_a_family_processor(tiny_model_dir: Path, processor: QwenVLProcessor) -> None:
    loaded = get_family("qwen-vl").load_processor(tiny_model_dir)
    assert isinstance(loaded, FamilyProcessor) and isinstance(processor, FamilyProcessor)
    assert not isinstance(processor.tokenizer, FamilyProcessor)  # the check is not vacuous
    tok = processor.tokenizer
    assert processor.pad_token_id == tok.eod_id
    assert set(processor.image_token_ids) == {tok.img_start_id, tok.img_pad_id, tok.img_end_id}
    assert processor.count_text_tokens("<ref>a</ref> and <|im_end|>") == len(
        tok.encode_content("<ref>a</ref> and <|im_end|>"))
    assert processor.vision_inputs([]) is None


def _hf_like(images: int, seed: int) -> VisionInputs:
    """Inputs shaped as the transformers families': patches [P, D] of all images + grid_thw [N, 3]."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 2, 2 + i] for i in range(images)])
    patches = torch.randn(int(grid.prod(-1).sum()), 12, generator=gen)
    return VisionInputs({"pixel_values": patches, "image_grid_thw": grid}, images)


def test_vision_inputs_concatenate_in_order_and_move_to_a_device() -> None:
    a, b = _hf_like(2, seed=0), _hf_like(1, seed=1)
    joined = VisionInputs.concat([a, None, b])
    assert joined is not None and joined.n_images == 3
    assert torch.equal(joined.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))
    assert joined.tensors["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 3], [1, 2, 2]]
    joined.pixel_values.zero_()
    assert a.pixel_values.abs().sum() > 0  # new tensors, never views of a part's
    assert VisionInputs.concat([None, None]) is None
    single = VisionInputs.concat([a])
    assert single is not None and single.pixel_values is not a.pixel_values
    with pytest.raises(QwenVLError, match="cannot concatenate"):
        VisionInputs.concat([a, VisionInputs({"pixel_values": torch.zeros(1, 3, 4, 4)}, 1)])
    with pytest.raises(QwenVLError, match="at least one image"):
        VisionInputs({"pixel_values": torch.zeros(0, 12)}, 0)

    moved = b.to("meta")
    assert moved.n_images == 1 and {t.device.type for t in moved.tensors.values()} == {"meta"}
    assert b.pixel_values.device.type == "cpu"

    def forward(input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> int:
        return int(image_grid_thw.prod(-1).sum()) - pixel_values.shape[0]

    assert forward(torch.zeros(1, 1), **b.as_kwargs()) == 0


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _official_labels(messages: list[Message], processor: QwenVLProcessor) -> tuple[list[int], list[int]]:
    """v1 ids (``chat.encode_conversation``) and the official finetune.py labels turn by turn: system / user
    ``[im_start] + ignore * (len - 3) + [im_end, nl]``; an assistant reply keeps ``<|im_start|>``, its content
    (image tokens ignored) and ``<|im_end|>\\n``; a weight-0 reply is all ignored."""
    tok = processor.tokenizer
    image_ids = {tok.img_start_id, tok.img_pad_id, tok.img_end_id}
    conv = encode_conversation(tok, messages, processor.n_queries)
    labels: list[int] = []
    for turn in conv.turns:
        ids = turn.ids
        if turn.role != "assistant":
            labels += [ids[0]] + [IGNORE_INDEX] * (len(ids) - 3) + ids[-2:]
        elif not turn.trainable:
            labels += [IGNORE_INDEX] * len(ids)
        else:
            content = [IGNORE_INDEX if i in image_ids else i for i in turn.content_ids]
            labels += [ids[0]] + [IGNORE_INDEX] * (len(turn.header_ids) - 1) + content + turn.footer_ids
    return conv.input_ids, labels


def test_v1_encoding_is_unchanged(tmp_path: Path, processor: QwenVLProcessor) -> None:
    red, blue = _png(tmp_path / "red.png", (220, 20, 20), (40, 30)), _png(tmp_path / "blue.png", (20, 20, 220), (17, 60))
    samples = [
        Sample("two-images", [
            Message("user", [ImagePart("red.png"), ImagePart("blue.png"), TextPart("Which one is red?")]),
            text_message("assistant", "The first."),
            Message("user", [TextPart("And this one?"), ImagePart("red.png")]),
            Message("assistant", [TextPart("<ref>red</ref><box>(1,2),(300,400)</box>")]),
        ]),
        Sample("weight-0", [
            text_message("system", "Answer briefly."),
            text_message("user", "hi"),
            Message("assistant", [TextPart("skip me")], trainable=False),
            text_message("user", "again"),
            text_message("assistant", "ok"),
        ]),
    ]
    sources = {"red.png": red, "blue.png": blue}
    rows = []
    for sample in samples:
        ids, labels = _official_labels(sample.messages, processor)
        images = [sources[p.source] for m in sample.messages for p in m.images]
        row = encode_sample(sample, processor, base_dir=tmp_path)
        assert (row.input_ids, row.labels) == (ids, labels)
        assert tokenize_sample(sample, processor).image_tokens == len(images) * (processor.n_queries + 2)
        if images:
            expected = torch.stack([preprocess_image(load_image(p), processor.image_size) for p in images])
            assert row.vision is not None and row.vision.n_images == len(images)
            assert torch.equal(row.vision.pixel_values, expected) and list(row.vision.tensors) == ["pixel_values"]
        else:
            assert row.vision is None
        rows.append(row)

    batch = Collator(processor.pad_token_id)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"][1, len(rows[1]):].eq(processor.tokenizer.eod_id).all()
    assert torch.equal(batch["pixel_values"], rows[0].vision.pixel_values)

    question = Sample("eval", [Message("user", [ImagePart(str(blue)), TextPart("Colour?")]),
                               text_message("assistant", "blue")])
    (item,) = task_items([question], processor, max_new_tokens=8)
    tok = processor.tokenizer
    prompt = encode_conversation(tok, question.messages[:1], processor.n_queries, add_generation_prompt=True)
    assert item.prompt_ids == prompt.input_ids and item.answer == "blue"
    assert item.vision is not None
    assert torch.equal(item.vision.pixel_values, preprocess_image(load_image(blue), processor.image_size)[None])
