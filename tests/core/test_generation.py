"""Generation: KV-cache decoding equals full recomputation, batching equals one-by-one, sampling controls."""

from __future__ import annotations

import random

import pytest
import torch

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import (
    RowState,
    SamplingParams,
    bias_tokens,
    filter_logits,
    generate,
    left_pad,
    make_rows,
    next_tokens,
    penalize,
    sample,
)
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


def _full(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``filter_logits`` over the whole vocabulary (its candidates scattered back when it returns only those)."""
    filtered, ids = filter_logits(logits, params)
    return filtered if ids is None else torch.full_like(logits, float("-inf")).scatter(1, ids, filtered)


def _kept(logits: torch.Tensor, **params) -> list[bool]:
    return torch.isfinite(_full(logits[None], [SamplingParams(do_sample=True, **params)]))[0].tolist()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _kept(logits, top_k=2) == [True, True, False, False]
    assert _kept(logits, top_p=0.7) == [True, True, False, False]
    assert _kept(logits, top_p=0.1) == [True, False, False, False]
    assert _kept(logits, top_k=3, top_p=0.7) == [True, True, False, False]
    assert sum(_kept(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=1)) == 1  # exactly k, ties too


@pytest.mark.parametrize("top_k", [0, 3])
def test_a_top_p_that_is_zero_in_float32_still_keeps_the_top_token(top_k):
    """min_tokens_to_keep=1 (transformers' TopPLogitsWarper): a tiny top_p (0 once in float32) is greedy-like
    sampling, never a row with every token excluded; batched with rows of other settings."""
    logits = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1]))
    for top_p in (1e-300, 5e-324, 1e-46):
        assert _kept(logits, top_p=top_p, top_k=top_k) == [False, True, False, False]
    params = [SamplingParams(do_sample=True, top_p=1e-300, top_k=top_k, seed=i) for i in range(3)]
    params.append(SamplingParams(do_sample=True, top_p=0.9, seed=3))
    assert next_tokens(logits.repeat(4, 1), make_rows(params, 4))[:3] == [1, 1, 1]


def test_tiny_temperatures_are_greedy_and_out_of_range_settings_are_refused():
    """A temperature that underflows float32 (or makes the logits overflow) would divide them into inf / NaN:
    below MIN_SAMPLING_TEMPERATURE a row is greedy; a seed a torch generator cannot take is refused up front."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    for temperature in (1e-300, 1e-40, 1e-9):
        params = SamplingParams(do_sample=True, temperature=temperature, seed=1)
        assert params.greedy
        assert next_tokens(logits, make_rows(params, 1)) == [1]
    assert not SamplingParams(do_sample=True, temperature=1e-5).greedy  # MIN_SAMPLING_TEMPERATURE: sampled
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": 1e39},
                {"seed": 2**64}, {"seed": -(2**63) - 1}):
        with pytest.raises(QwenVLError, match=next(iter(bad))):
            SamplingParams(do_sample=True, **bad)
    for seed in (-(2**63), 2**64 - 1):  # the generator's whole range
        assert len(next_tokens(logits, make_rows(SamplingParams(do_sample=True, seed=seed), 1))) == 1


def _filter_one_row(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filter written for one row at a time, as a reference for the batched one."""
    logits = logits.float() / p.temperature
    if 0 < p.top_k < logits.numel():
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(0, torch.topk(logits, p.top_k).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, (probs.cumsum(-1) - probs) >= p.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@pytest.mark.parametrize("rows", [
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 40, 0.9), (2.0, 300, 0.5), (1.0, 1, 1.0), (0.9, 299, 0.99)],
    [(0.7, 5, 1.0), (0.5, 40, 0.9), (1.0, 1, 1.0), (0.9, 299, 0.99), (1.2, 17, 0.3)],  # all top-k: candidates only
])
def test_batched_filter_equals_each_row_filtered_alone(rows):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), 300, generator=gen) * 3
    params = [SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p) for t, k, p in rows]
    batched = _full(logits, params)
    for row, p in enumerate(params):
        alone = _filter_one_row(logits[row], p)
        assert torch.equal(torch.isfinite(batched[row]), torch.isfinite(alone)), p
        assert torch.allclose(batched[row][torch.isfinite(alone)], alone[torch.isfinite(alone)])


@pytest.mark.parametrize(("top_k", "top_p", "expected"), [
    (0, 0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # the vocabulary, sorted for top-p
    (2, 1.0, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # the top-k candidates only
])
def test_sampling_draws_from_the_filtered_distribution_with_each_rows_own_generator(top_k, top_p, expected):
    n = 4000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(n, 1)
    rows = make_rows([SamplingParams(do_sample=True, top_k=top_k, top_p=top_p, seed=i) for i in range(n)], n)
    drawn = torch.tensor(next_tokens(logits, rows))
    frequency = torch.bincount(drawn, minlength=4).float() / n
    assert torch.allclose(frequency, torch.tensor(expected), atol=0.03), frequency
    assert all(frequency[i] == 0 for i, e in enumerate(expected) if e == 0)


def test_a_seeded_row_draws_the_same_tokens_whatever_rows_share_its_batch():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    mine = SamplingParams(do_sample=True, top_k=3, top_p=0.95, temperature=1.5, seed=11)
    others = [SamplingParams(do_sample=True, top_k=40, seed=12), SamplingParams(do_sample=True, seed=13)]

    def steps(params: list[SamplingParams]) -> list[int]:
        rows = make_rows(params, len(params))
        return [next_tokens(logits[: len(params)], rows)[0] for _ in range(20)]

    alone = steps([mine])
    assert len(set(alone)) > 1  # it does sample
    assert steps([mine, others[0]]) == alone and steps([mine, *others]) == alone


def _penalised_by_formula(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """OpenAI's formula from each row's whole token list: logit - frequency * count - presence * (count > 0)."""
    expected = logits.clone()
    for r, state in enumerate(rows):
        if state.done or not state.params.penalised:
            continue
        for token in set(state.tokens):
            count = state.tokens.count(token)
            expected[r, token] -= state.params.frequency_penalty * count + state.params.presence_penalty
    return expected


def test_penalty_counts_kept_across_steps_equal_a_count_of_every_token():
    """``penalize`` keeps each row's counts and adds only the tokens of the steps since; whatever joins, finishes
    or changes between steps, the result is the formula over all the row's tokens (and the input is untouched)."""
    draw = random.Random(3)
    vocab = 50
    penalties = [SamplingParams(frequency_penalty=0.7, presence_penalty=0.4),
                 SamplingParams(frequency_penalty=-0.5), SamplingParams(presence_penalty=1.5), SamplingParams()]
    rows = [RowState(params=p, generator=None) for p in penalties]
    for step in range(12):
        if step == 4:  # a row joins the batch with tokens of its own (a request that was decoding elsewhere)
            rows.append(RowState(params=penalties[0], generator=None, tokens=[1, 1, 2]))
        if step == 7:
            rows[1].finish_reason = "stop"
        for state in rows:
            if not state.done:
                state.tokens += [draw.randrange(vocab) for _ in range(1 if step % 3 else 2)]
        logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(step))
        before = logits.clone()
        assert torch.allclose(penalize(logits, rows), _penalised_by_formula(logits, rows), atol=1e-5), step
        assert torch.equal(logits, before)
    assert rows[0].counted == len(rows[0].tokens) and rows[3].counts is None  # an unpenalised row is not counted
    wider = torch.zeros(len(rows), vocab + 7)  # other logits (another vocabulary): counted again from the start
    assert torch.allclose(penalize(wider, rows), _penalised_by_formula(wider, rows), atol=1e-5)
    assert rows[0].counts.shape == (vocab + 7,)


@pytest.mark.parametrize("top_k", [0, 2])
def test_rows_that_cannot_be_sampled_are_named_and_greedy_rows_are_unaffected(top_k):
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")  # every token excluded
    sampling = SamplingParams(do_sample=True, seed=1, top_k=top_k)
    _, valid = sample(filter_logits(logits, [sampling] * 3)[0], [r.generator for r in make_rows(sampling, 3)])
    assert valid.tolist() == [True, False, False]
    with pytest.raises(QwenVLError, match=r"no token can be sampled.*rows \[1, 2\] of the batch"):
        next_tokens(logits, make_rows(sampling, 3))
    assert len(next_tokens(logits[:1], make_rows(sampling, 1))) == 1
    greedy = [RowState(params=SamplingParams(), generator=None) for _ in range(3)]
    assert len(next_tokens(logits, greedy)) == 3  # an argmax always exists


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


def test_bias_entries_kept_for_the_same_rows_are_remade_when_the_rows_change():
    """``bias_tokens`` keeps the last rows' entries on the device: the same rows step after step get the same
    result, and any change (a row finished, another row, the rows reordered, another vocabulary or dtype) is seen."""
    def row(*bias: tuple[int, float], suppressed: tuple[int, ...] = ()) -> RowState:
        return RowState(params=SamplingParams(logit_bias=bias, suppress_token_ids=suppressed), generator=None)

    def expected(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        out = logits.clone()
        for r, state in enumerate(rows):
            if not state.done:
                for i, bias in state.params.logit_bias:
                    out[r, i] += bias
                out[r, list(state.params.suppress_token_ids)] = float("-inf")
        return out

    logits = torch.randn(3, 8)
    a, b, c = row((1, 2.0)), row((2, -1.0), suppressed=(5,)), row((3, 4.0), (1, 0.5))
    for rows in ([a, b, c], [a, b, c], [c, b, a], [a, b], [a, b, row((1, 2.0))]):
        got = bias_tokens(logits[: len(rows)], rows)
        assert torch.equal(got, expected(logits[: len(rows)], rows)), rows
    b.finish_reason = "stop"  # the same objects, one of them finished since
    assert torch.equal(bias_tokens(logits, [a, b, c]), expected(logits, [a, b, c]))
    assert bias_tokens(logits[:, :2], [a, b, c])[0, 1] == logits[0, 1] + 2.0  # a smaller vocabulary drops id 3
    assert bias_tokens(logits[:, :2], [a, b, c])[2, 1] == logits[2, 1] + 0.5
    half = bias_tokens(logits.half(), [a, b, c])
    assert half.dtype == torch.float16 and torch.equal(half, expected(logits.half(), [a, b, c]))
    plain = [row(), row()]
    assert torch.equal(bias_tokens(logits[:2], plain), logits[:2])  # rows without entries: the logits as they were
