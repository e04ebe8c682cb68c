"""Generation: KV-cache decoding equals full recomputation, batching equals one-by-one, sampling controls."""

from __future__ import annotations

import random

import pytest
import torch

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import SamplingParams, filter_logits, generate, left_pad
from qwenvl_core.models.processing import VisionInputs
from qwenvl_core.models.registry import get_family


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    family = get_family("qwen-vl")
    model = family.load_model(tiny_model_dir)
    processor = family.load_processor(tiny_model_dir)
    return model, processor, family.stop_token_ids(processor)


def _argmax_reference(model, prompt: list[int], pixel_values, steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache, no batching)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def _image(color: tuple[int, int, int]):
    from PIL import Image

    return Image.new("RGB", (40, 30), color)


def _prompt(processor, text: str, images=()):
    parts = [ImagePart(img) for img in images] + [TextPart(text)]
    return processor.encode_chat([Message(role="user", parts=parts)], add_generation_prompt=True)


def test_kv_cache_greedy_equals_no_cache_argmax(loaded):
    model, processor, _ = loaded
    enc = _prompt(processor, "What colour is the shape?", [_image((255, 0, 0))])
    params = SamplingParams(max_new_tokens=8)
    out = generate(model, [enc.input_ids], pad_token_id=processor.pad_token_id, params=params, vision=enc.vision)
    assert out[0].token_ids == _argmax_reference(model, enc.input_ids, enc.pixel_values, 8)
    assert out[0].finish_reason == "length"


def test_batched_left_padded_generation_equals_one_by_one(loaded):
    model, processor, _ = loaded
    pad = processor.tokenizer.eod_id
    encs = [
        _prompt(processor, "hi"),
        _prompt(processor, "Describe both pictures in detail, please.", [_image((0, 0, 255)), _image((0, 255, 0))]),
        _prompt(processor, "图片里有什么？", [_image((255, 255, 0))]),
    ]
    params = SamplingParams(max_new_tokens=6)
    singles = [
        generate(model, [e.input_ids], pad_token_id=pad, params=params, vision=e.vision)[0].token_ids
        for e in encs
    ]
    vision = VisionInputs.concat(e.vision for e in encs)
    batched = generate(model, [e.input_ids for e in encs], pad_token_id=pad, params=params, vision=vision)
    assert [b.token_ids for b in batched] == singles
    no_cache = generate(model, [e.input_ids for e in encs], pad_token_id=pad, params=params,
                        vision=vision, use_cache=False)
    assert [b.token_ids for b in no_cache] == singles


def test_stop_token_ids_end_the_row_and_are_not_returned(loaded):
    model, processor, _ = loaded
    enc = _prompt(processor, "count to three")
    pad = processor.tokenizer.eod_id
    free = generate(model, [enc.input_ids], pad_token_id=pad, params=SamplingParams(max_new_tokens=5))[0]
    stop_at = free.token_ids[2]
    first = free.token_ids.index(stop_at)
    stopped = generate(model, [enc.input_ids], pad_token_id=pad,
                       params=SamplingParams(max_new_tokens=5, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:first]


def test_stop_strings_cut_the_text(loaded):
    model, processor, _ = loaded
    tok = processor.tokenizer
    enc = _prompt(processor, "say something")
    free = generate(model, [enc.input_ids], pad_token_id=tok.eod_id, params=SamplingParams(max_new_tokens=6),
                    decode=tok.decode)[0]
    assert free.text == tok.decode(free.token_ids)
    needle = free.text[len(free.text) // 2 :][:2] or free.text
    stopped = generate(model, [enc.input_ids], pad_token_id=tok.eod_id,
                       params=SamplingParams(max_new_tokens=6, stop_strings=(needle,)), decode=tok.decode)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(needle)]
    assert needle not in stopped.text


def test_sampling_is_reproducible_with_a_seed_and_rows_are_independent(loaded):
    model, processor, _ = loaded
    enc = _prompt(processor, "tell me a story")
    pad = processor.tokenizer.eod_id
    sample = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=7)
    a = generate(model, [enc.input_ids], pad_token_id=pad, params=sample)[0].token_ids
    b = generate(model, [enc.input_ids], pad_token_id=pad, params=sample)[0].token_ids
    assert a == b
    other = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=8)
    rows = generate(model, [enc.input_ids, enc.input_ids], pad_token_id=pad, params=[sample, other])
    assert rows[0].token_ids == a
    greedy = generate(model, [enc.input_ids], pad_token_id=pad, params=SamplingParams(max_new_tokens=10))[0]
    top1 = SamplingParams(max_new_tokens=10, do_sample=True, top_k=1, seed=3)
    assert generate(model, [enc.input_ids], pad_token_id=pad, params=top1)[0].token_ids == greedy.token_ids


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=2, top_p=1.0))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=0, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, 1.0, top_k=0, top_p=0.1))
    assert kept.tolist() == [True, False, False, False]


def test_left_pad_and_parameter_validation():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(QwenVLError):
        left_pad([[1], []], pad_token_id=0)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}):
        with pytest.raises(QwenVLError):
            SamplingParams(**bad)


def test_stop_strings_need_a_decoder(loaded):
    model, processor, _ = loaded
    prompt = processor.encode_chat([text_message("user", "x")]).input_ids
    with pytest.raises(QwenVLError, match="decode"):
        generate(model, [prompt], pad_token_id=0, params=SamplingParams(max_new_tokens=2, stop_strings=("a",)))


# ----- stop strings: incremental decoding and tail search equal the straightforward full search ----------------
def _byte_decode(ids: list[int]) -> str:
    """Byte-level decoding as the tokenizer does it: ids are bytes, invalid / incomplete UTF-8 -> U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def _reference_row(tokens: list[int], params: SamplingParams) -> tuple[list[int], str | None, str]:
    """The straightforward rule: decode everything, search the whole text, after every token."""
    kept: list[int] = []
    text = None
    for token in tokens:
        if token in params.stop_token_ids:
            return kept, text, "stop"
        kept.append(token)
        text = _byte_decode(kept)
        hits = [i for s in params.stop_strings if (i := text.find(s)) >= 0]
        if hits:
            return kept, text[: min(hits)], "stop"
        if len(kept) >= params.max_new_tokens:
            return kept, text, "length"
    return kept, text, "length"


def test_advance_row_stop_strings_equal_a_full_search_on_random_texts():
    from qwenvl_core.generation import advance_row, make_rows

    rng = random.Random(0)
    alphabet = list("ab\n ") + ["é", "€", "中", "😀"]  # 1- to 4-byte characters, split across "tokens"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))).encode()
        tokens = list(text)
        stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)})
        params = SamplingParams(max_new_tokens=rng.randint(1, 80), stop_strings=stops)
        (row,) = make_rows(params, 1)
        for token in tokens:
            advance_row(row, token, _byte_decode)
            if row.done:
                break
        assert (row.tokens, row.text, row.finish_reason or "length") == _reference_row(tokens, params)


def test_twenty_thousand_steps_with_long_stop_strings():
    from qwenvl_core.generation import advance_row, make_rows

    stops = ("x" * 300 + "STOP", "y" * 500)
    (row,) = make_rows(SamplingParams(max_new_tokens=30_000, stop_strings=stops), 1)
    pattern = list(b"xxxxyyy\n")
    for step in range(20_000):
        advance_row(row, pattern[step % len(pattern)], _byte_decode)
    assert not row.done and len(row.text) == 20_000 and row.stable_tokens == 20_000
    for token in ("x" * 300 + "STOP").encode():
        advance_row(row, token, _byte_decode)
    assert row.finish_reason == "stop" and row.text.endswith("yyy\n") and len(row.text) == 20_000
