"""Autoregressive generation with a KV cache, for any model that follows the forward contract.

The contract (``docs/architecture.md``): ``model(input_ids, attention_mask, position_ids, cache (the KV cache:
transformers 5's name, which v1 also takes), use_cache=True, prompt_lengths, **vision.as_kwargs(), **model_kwargs)`` returns an object with ``logits``
``[B, T, V]`` and the new KV cache in ``cache`` (the transformers 5 name of ``past_key_values`` on model outputs). Prompts of
different lengths are batched with **left padding**, so every row's next token is read from the last column and
positions are ``cumsum(attention_mask) - 1`` (padding does not shift them). ``prompt_lengths`` ``[B]`` (each
row's prompt length) goes to every forward, cached or not: length-dependent position scaling (Qwen-VL's dynamic
NTK) is fixed by the prompt for the whole generation, as in the official model, so cached and uncached decoding
agree beyond ``seq_length`` too. Extra ``model_kwargs`` are passed to every forward (for example peft's
``adapter_names`` for mixed-adapter batches).

Each row may carry its own ``SamplingParams`` (greedy or sampling with temperature / top-k / top-p and its own
seed), stop token ids, stop strings and suppressed token ids: serving batches requests from different users
together. Suppressed ids (the image-span structure, which callers take from ``processor.image_token_ids``; for
Qwen-VL ``<img>``, ``</img>``, ``<imgpad>``) get a logit of -inf before greedy or sampled choice, so
they are never emitted: a generated image tag would otherwise break the next step (no pixels for it). A row's
``logit_bias`` (OpenAI's: token id -> a value in [-100, 100] added to its logit) is added in the same scatter, so
no bias brings a suppressed id back.

Per row too, OpenAI's penalties and structured output: ``presence_penalty`` / ``frequency_penalty`` subtract
``frequency * count + presence * (count > 0)`` from the logit of every token by its count among the row's tokens
so far (the counts are kept per row on the device and take only each step's new tokens; all penalised rows at
once), and a row with a ``grammar`` (``qwenvl_core.grammar``, llguidance)
may only take the tokens its grammar allows next (all constrained rows' masks computed at once). A row with
``logprobs`` records, for each token it takes, the token's log-probability and its ``logprobs`` most likely
alternatives (``RowState.logprobs``), from the distribution the token was chosen from after penalties,
suppression and the grammar, before temperature / top-k / top-p (vLLM's "processed" choice is after
temperature too; OpenAI does not document it). These all run as batched tensor operations over the rows that
use them, and so does sampling: temperature / top-k / top-p for all sampling rows at once, each row drawing one
uniform number per step from its own seeded generator. A step's choices reach the host in one copy (the logprobs
records in one more).

Stop strings are found in time linear in the output: the text is decoded incrementally (only the tokens after
the last whole character are decoded again) and only the tail that can hold a new match is searched.

The per-row pieces (``make_rows``, ``next_tokens``, ``advance_row``, ``finish_row``, ``positions_from_mask``) are
public so that the serving engine (``qwenvl_core.serving.engine``), which decodes step by step with requests
joining and leaving the batch, uses exactly the same sampling and stop numerics as ``generate``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from qwenvl_core.devices import host_to_device, model_device
from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.processing import VisionInputs

if TYPE_CHECKING:
    from qwenvl_core.grammar import GrammarConstraint
    from qwenvl_core.vocabulary import Vocabulary

FinishReason = Literal["stop", "length"]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty / frequency_penalty: [-2, 2]
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
# What a torch generator's ``manual_seed`` takes (a negative seed wraps modulo 2**64)
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Below this a temperature is greedy decoding (as vLLM does): dividing logits by it would overflow to inf / NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. ``do_sample=False`` or a temperature below ``MIN_SAMPLING_TEMPERATURE`` (0 among them)
    means greedy."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    suppress_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none recorded; k: each token's log-probability and its k top alternatives
    grammar: str | None = None  # an llguidance grammar the output follows (``qwenvl_core.grammar.json_grammar``)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit), OpenAI's ``logit_bias``

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QwenVLError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN too; logits are divided by it in float32
            raise QwenVLError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QwenVLError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise QwenVLError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise QwenVLError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        if any(not s for s in self.stop_strings):
            raise QwenVLError("stop strings must not be empty")
        if any(i < 0 for i in self.suppress_token_ids):
            raise QwenVLError(f"suppressed token ids must be >= 0, got {self.suppress_token_ids}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise QwenVLError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise QwenVLError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise QwenVLError(f"logit_bias: token ids must be >= 0 and values in [-{MAX_LOGIT_BIAS:g}, "
                                  f"{MAX_LOGIT_BIAS:g}], got {token}: {bias}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise QwenVLError("logit_bias: a token id appears twice")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass
class GenerationOutput:
    """One row's result. ``token_ids`` excludes the stop token; ``text`` is cut before a stop string."""

    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason


@dataclass(frozen=True)
class StepLogprobs:
    """A taken token's log-probability and the ``k`` most likely tokens of its step, as (id, log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowState:
    """One row's decoding state: its params, its RNG, the tokens and text so far, why it finished.

    ``stable_tokens`` / ``stable_text``: the leading tokens whose text ends on a whole character, and that text;
    only the tokens after them are decoded again at each step (``advance_row``). ``logprobs``: one record per
    token of ``tokens`` when ``params.logprobs`` is set (``pending_logprobs``: the record of the token chosen
    this step, until ``advance_row`` takes it). ``constraint``: the row's grammar state when ``params.grammar``.
    ``counts`` (penalised rows): each vocabulary token's count among ``tokens[:counted]``, ``[V]`` on the device
    of the logits, kept up to date by ``penalize`` (only the tokens added since its last step are counted).
    """

    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: FinishReason | None = None
    stable_tokens: int = 0
    stable_text: str = ""
    logprobs: list[StepLogprobs] = field(default_factory=list)
    pending_logprobs: StepLogprobs | None = None
    constraint: GrammarConstraint | None = None
    counts: torch.Tensor | None = None
    counted: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask``, both ``[B, T_max]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise QwenVLError("every prompt must have at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k, then nucleus (top-p) filtering of logits ``[N, V]``, row ``i`` with ``params[i]``;
    a filtered token's logit is -inf. Top-k keeps exactly k tokens (ties at the k-th in sort order).

    Returns the filtered logits (float32) and the token ids of their columns. ``None``: the columns are the
    vocabulary (temperature only). Otherwise the columns are in descending order: the vocabulary sorted (some row
    has a top-p, or only some rows have a top-k), or, when every row has a top-k, only the candidates, ``[N, K]``
    for the largest k (one top-k instead of a sort of the vocabulary). All rows at once; the rows' settings go to
    the device in one copy that does not wait for it."""
    vocab = logits.size(-1)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    nucleus = any(p.top_p < 1.0 for p in params)
    # per row: temperature, top-k (0: none), top-p (2: none; no cumulative probability reaches it)
    settings = host_to_device([[p.temperature, k, p.top_p if p.top_p < 1.0 else 2.0] for p, k in zip(params, ks,
                                                                                                     strict=True)],
                              logits.device, torch.float32)
    logits = logits.float() / settings[:, :1]
    if all(ks):
        logits, ids = torch.topk(logits, max(ks), dim=-1)
    elif any(ks) or nucleus:
        logits, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        return logits, None
    rank = torch.arange(logits.size(-1), device=logits.device)[None, :]
    top_k = settings[:, 1:2]
    logits = logits.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    if nucleus:  # drop a token when the tokens before it already cover top_p; the first one is always kept, even
        # for a top_p that is 0 in float32 (min_tokens_to_keep=1, as in transformers' TopPLogitsWarper)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(((probs.cumsum(dim=-1) - probs) >= settings[:, 2:3]) & (rank > 0), float("-inf"))
    return logits, ids


def sample(filtered: torch.Tensor, generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row of ``filtered`` logits ``[N, W]``, drawn from its softmax by the inverse of its
    cumulative distribution at one uniform number from row ``i``'s own generator (one draw per row and step
    whatever the width: a seeded row draws the same tokens whatever rows share its batch). Returns the columns
    ``[N]`` and whether each row could be sampled at all ``[N]`` (False: NaN or infinite logits, or every token
    filtered out). No sync with the host, and an invalid row is reported, not asserted on the device
    (``torch.multinomial`` checks its input with a device-side assert on CUDA, which leaves the process's CUDA
    context unusable: every request of the replica would fail with it)."""
    probs = torch.softmax(filtered, dim=-1)
    cdf = probs.cumsum(dim=-1)
    uniform = torch.empty(len(generators), 1, dtype=cdf.dtype, device=cdf.device)
    for row, generator in enumerate(generators):
        uniform[row].uniform_(generator=generator)
    # the first column whose cumulative probability exceeds u * total: column j with probability p_j / total
    column = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)[:, 0]
    return column, ~probs.isnan().any(dim=-1)


def bias_tokens(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """``logits`` ``[B, V]`` plus each row's ``logit_bias``, with its ``suppress_token_ids`` at -inf whatever their
    bias (a copy; the input is untouched). One scatter that adds: a suppressed id's -inf absorbs any bias."""
    entries = _BIAS_ENTRIES.of(rows, logits)
    if entries is None:
        return logits
    index, values = entries
    return logits.index_put((index[:, 0], index[:, 1]), values, accumulate=True)


class _BiasEntries:
    """``bias_tokens``' entries on the device: (row, token id) ``[N, 2]`` and what each adds ``[N]`` (None: none).
    The last rows' are kept: a decode loop asks for the same rows step after step (they change at a join, a leave,
    a finish), and making them is a Python loop over every row's biased and suppressed ids (the image tokens, for
    every request the engine serves) and a copy to the device. One entry, replaced whole, so a call from another
    thread can only miss; the rows are held by weak references."""

    def __init__(self) -> None:
        self._last: tuple[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def of(self, rows: Sequence[RowState], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        vocab, device, dtype = logits.size(-1), logits.device, logits.dtype
        last = self._last
        if last is not None:
            (refs, *kept), entries = last
            if kept == [vocab, device, dtype] and len(refs) == len(rows) and all(
                    ref is None if state.done else ref is not None and ref() is state
                    for ref, state in zip(refs, rows, strict=True)):
                return entries
        listed = [(r, i, bias) for r, state in enumerate(rows) if not state.done
                  for i, bias in _token_offsets(state.params) if i < vocab]
        entries = None
        if listed:
            entries = (host_to_device([(r, i) for r, i, _ in listed], device, torch.long),
                       host_to_device([bias for _, _, bias in listed], device, dtype))
        refs = tuple(None if state.done else weakref.ref(state) for state in rows)
        self._last = ((refs, vocab, device, dtype), entries)
        return entries


_BIAS_ENTRIES = _BiasEntries()


def _token_offsets(params: SamplingParams) -> list[tuple[int, float]]:
    """What a row adds to its logits by token id: its ``logit_bias``, and -inf for each suppressed id."""
    return [*params.logit_bias, *((i, float("-inf")) for i in params.suppress_token_ids)]


def penalize(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """OpenAI's presence / frequency penalties: each penalised row's logit of token ``j`` minus
    ``frequency_penalty * c[j] + presence_penalty * (c[j] > 0)``, ``c[j]`` the count of ``j`` among the row's
    tokens so far. All penalised rows at once (a copy; the input is untouched): their counts (``RowState.counts``)
    are stacked and only the tokens each row added since its previous step are counted into them, so a step
    costs the same at the thousandth token as at the first."""
    index = [r for r, state in enumerate(rows) if state.params.penalised and state.tokens and not state.done]
    if not index:
        return logits
    device, vocab = logits.device, logits.size(-1)
    for r in index:  # a row new to penalties (or to this vocabulary) is counted from its first token
        state = rows[r]
        if state.counts is None or state.counts.shape != (vocab,) or state.counts.device != device:
            state.counts, state.counted = logits.new_zeros(vocab, dtype=torch.float32), 0
    counts = torch.stack([rows[r].counts for r in index])  # [N, V], a copy
    added = [rows[r].tokens[rows[r].counted :] for r in index]
    tokens = [t for new in added for t in new]
    if tokens:
        ids = host_to_device(tokens, device, torch.long)
        which = torch.repeat_interleave(torch.arange(len(index), device=device),
                                        host_to_device([len(new) for new in added], device, torch.long),
                                        output_size=len(tokens))  # known here: no wait for the device to count it
        # ids beyond the logits (none from the model itself) count 0, without a data-dependent selection
        counts.index_put_((which, ids.clamp(max=vocab - 1)), (ids < vocab).to(counts.dtype), accumulate=True)
    for j, r in enumerate(index):
        rows[r].counts, rows[r].counted = counts[j], len(rows[r].tokens)
    frequency = host_to_device([rows[r].params.frequency_penalty for r in index], device, torch.float32)[:, None]
    presence = host_to_device([rows[r].params.presence_penalty for r in index], device, torch.float32)[:, None]
    rows_index = host_to_device(index, device, torch.long)
    penalised = logits.index_select(0, rows_index).float()  # in place from here: each [N, V] pass costs
    penalised.addcmul_(counts, frequency, value=-1.0)
    penalised.addcmul_(counts.clamp(max=1.0), presence, value=-1.0)  # counts are whole: min(c, 1) is (c > 0)
    return logits.index_copy(0, rows_index, penalised.to(logits.dtype))


def constrain(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """``logits`` with every token a row's grammar does not allow next set to -inf (a copy when any row has one)."""
    index = [r for r, state in enumerate(rows) if state.constraint is not None and not state.done]
    if not index:
        return logits
    from qwenvl_core.grammar import allowed_tokens

    allowed = allowed_tokens([rows[r].constraint for r in index], logits.size(-1), logits.device)  # type: ignore[misc]
    rows_index = host_to_device(index, logits.device, torch.long)
    logits = logits.clone()
    logits[rows_index] = logits[rows_index].masked_fill(~allowed, float("-inf"))
    return logits


def record_logprobs(logits: torch.Tensor, rows: Sequence[RowState], chosen: Sequence[int]) -> None:
    """Set ``pending_logprobs`` of each row that asks for logprobs: the chosen token's log-probability under
    ``logits`` and the row's top-k; all rows in one log-softmax, one top-k and one copy to the host."""
    index = [r for r, state in enumerate(rows) if state.params.logprobs is not None and not state.done]
    if not index:
        return
    device = logits.device
    logp = torch.log_softmax(logits[host_to_device(index, device, torch.long)].float(), dim=-1)
    picked = logp.gather(1, host_to_device([[chosen[r]] for r in index], device, torch.long))[:, 0]
    k = min(max(rows[r].params.logprobs or 0 for r in index), logp.size(-1))
    top_values, top_ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    host = torch.cat([picked[:, None], top_values, top_ids.to(logp.dtype)], dim=1).cpu()  # one copy (ids < 2^24)
    for j, r in enumerate(index):
        n = rows[r].params.logprobs or 0
        values, ids = host[j, 1 : 1 + n].tolist(), host[j, 1 + k : 1 + k + n].long().tolist()
        rows[r].pending_logprobs = StepLogprobs(chosen[r], float(host[j, 0]), tuple(zip(ids, values, strict=True)))


def next_tokens(logits: torch.Tensor, rows: list[RowState]) -> list[int]:
    """Pick each row's next token from ``logits`` ``[B, V]`` (never one of the row's suppressed ids), after each
    row's penalties and grammar; rows that ask for logprobs get this step's record (``record_logprobs``). Greedy
    rows take the argmax, sampling rows are filtered and drawn all at once (``filter_logits``, ``sample``), and the
    choices reach the host in one copy. Raises ``QwenVLError`` naming the rows that cannot be sampled."""
    logits = constrain(bias_tokens(penalize(logits, rows), rows), rows)
    chosen = logits.argmax(dim=-1)
    sampled = [r for r, state in enumerate(rows) if not state.done and not state.params.greedy]
    if not sampled:
        picks = chosen.tolist()
    else:
        invalid = torch.zeros_like(chosen)
        vocab = logits.size(-1)
        with_top_k = [r for r in sampled if 0 < rows[r].params.top_k < vocab]  # sampled among their candidates
        without = [r for r in sampled if not 0 < rows[r].params.top_k < vocab]
        for group in (with_top_k, without):
            if not group:
                continue
            index = host_to_device(group, logits.device, torch.long)
            filtered, ids = filter_logits(logits[index], [rows[r].params for r in group])
            column, valid = sample(filtered, [rows[r].generator for r in group])
            drawn = column if ids is None else ids.gather(1, column[:, None])[:, 0]
            chosen = chosen.index_copy(0, index, drawn)
            invalid = invalid.index_copy(0, index, (~valid).long())
        host = torch.cat([chosen, invalid]).tolist()  # one copy
        picks = host[: len(rows)]
        failing = [r for r, bad in enumerate(host[len(rows) :]) if bad]
        if failing:
            where = f" (rows {failing} of the batch)" if len(rows) > 1 else ""
            raise QwenVLError(f"no token can be sampled: the logits are NaN or infinite, or every token is "
                              f"excluded{where}")
    record_logprobs(logits, rows, picks)
    return picks


def advance_row(state: RowState, token: int, decode: Callable[[list[int]], str] | None) -> None:
    """Record ``token`` for a row and decide whether the row is finished."""
    params = state.params
    pending, state.pending_logprobs = state.pending_logprobs, None
    if token in params.stop_token_ids:
        state.finish_reason = "stop"
        return
    state.tokens.append(token)
    if pending is not None:
        state.logprobs.append(pending)
    if state.constraint is not None:
        state.constraint.consume(token)
    if decode is not None:
        changed_from = _decode_incrementally(state, decode)
        cut = stop_string_cut(state.text or "", params.stop_strings, changed_from)
        if cut is not None:
            state.text = (state.text or "")[:cut]
            state.finish_reason = "stop"
            return
    if len(state.tokens) >= params.max_new_tokens:
        state.finish_reason = "length"


def _decode_incrementally(state: RowState, decode: Callable[[list[int]], str]) -> int:
    """Set ``state.text`` to the text of all tokens; returns the index from which it may differ from before.

    Byte-level BPE text splits at a whole character: decode(a + b) == decode(a) + decode(b) when the bytes of
    ``a`` end on a character boundary, i.e. when decode(a) does not end with U+FFFD (an incomplete character).
    So only the tokens after ``stable_tokens`` are decoded, and the stable part grows whenever the text is whole.
    """
    tail = decode(state.tokens[state.stable_tokens :])
    changed_from = len(state.stable_text)
    state.text = state.stable_text + tail
    if not tail.endswith("\ufffd"):
        state.stable_tokens, state.stable_text = len(state.tokens), state.text
    return changed_from


def stop_string_cut(text: str, stop_strings: Sequence[str], changed_from: int = 0) -> int | None:
    """The index where the earliest stop string starts in ``text``, or None.

    ``changed_from``: ``text[:changed_from]`` was already searched (it held no stop string), so only matches
    ending after it are looked for: each search covers the new text plus ``len(stop) - 1`` characters before it.
    """
    hits = [i for s in stop_strings if (i := text.find(s, max(0, changed_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def make_rows(params: SamplingParams | Sequence[SamplingParams], batch: int,
              device: torch.device | str = "cpu", vocabulary: Vocabulary | None = None) -> list[RowState]:
    """Fresh row states (sampling rows get their own seeded generator, on ``device``: the device of the logits
    they sample from, where ``sample`` draws their noise). Rows with a ``grammar`` get its
    matcher over ``vocabulary`` (the tokenizer's, ``qwenvl_core.vocabulary``), ending at their stop ids."""
    per_row = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != batch:
        raise QwenVLError(f"got {len(per_row)} SamplingParams for {batch} prompts")
    rows = []
    for p in per_row:
        generator = None
        if not p.greedy:
            generator = torch.Generator(device=device)
            if p.seed is None:
                generator.seed()  # a fresh non-deterministic seed, without touching the global RNG
            else:
                generator.manual_seed(p.seed)
        rows.append(RowState(params=p, generator=generator, constraint=_constraint(p, vocabulary)))
    return rows


def _constraint(params: SamplingParams, vocabulary: Vocabulary | None) -> GrammarConstraint | None:
    if params.grammar is None:
        return None
    if vocabulary is None:
        raise QwenVLError("a grammar needs the tokenizer's vocabulary")
    from qwenvl_core.grammar import GrammarConstraint

    return GrammarConstraint(params.grammar, vocabulary, params.stop_token_ids)


@torch.no_grad()  # not inference_mode: ZeRO-3 re-gathers parameters inside the forward, and inference
# tensors there break its later requires_grad bookkeeping (the final evaluation runs after the adapter save)
def generate(
    model: Callable[..., Any],
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    vision: VisionInputs | None = None,
    decode: Callable[[list[int]], str] | None = None,
    use_cache: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    vocabulary: Vocabulary | None = None,
) -> list[GenerationOutput]:
    """Generate a continuation for each prompt (token ids), batched with left padding.

    ``vision`` holds the images of all prompts in order of appearance (``VisionInputs.concat`` of the prompts'). ``decode`` turns token ids into
    text; it is needed for stop strings and fills ``GenerationOutput.text``. ``use_cache=False`` recomputes
    the whole sequence at every step (a slow reference used by tests). ``vocabulary``: needed by rows with a
    ``grammar``.
    """
    device = model_device(model)
    rows = make_rows(params, len(prompts), device, vocabulary)
    if any(p.params.stop_strings for p in rows) and decode is None:
        raise QwenVLError("stop strings need a decode function")
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    extra = dict(model_kwargs or {})
    images = {} if vision is None else vision.to(device).as_kwargs()

    extra["prompt_lengths"] = attention_mask.sum(dim=-1)  # [B]
    step_ids, past = input_ids, None
    for _ in range(max(r.params.max_new_tokens for r in rows)):
        if use_cache:
            logits, past = _forward_cached(model, step_ids, attention_mask, past, images, extra)
        else:
            logits = _forward_full(model, input_ids, attention_mask, images, extra)
        for state, token in zip(rows, next_tokens(logits, rows), strict=True):
            if not state.done:
                advance_row(state, token, decode)
        if all(r.done for r in rows):
            break
        next_ids = torch.tensor(
            [[r.tokens[-1] if r.tokens and not r.done else pad_token_id] for r in rows], device=device
        )
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        step_ids = next_ids
    return [finish_row(r, decode) for r in rows]


def finish_row(state: RowState, decode: Callable[[list[int]], str] | None) -> GenerationOutput:
    """The row's ``GenerationOutput``."""
    if state.text is None and decode is not None:
        state.text = decode(state.tokens)
    return GenerationOutput(
        token_ids=state.tokens, text=state.text, finish_reason=state.finish_reason or "length"
    )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` (left padding does not shift positions)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def _forward_cached(
    model: Callable[..., Any],
    step_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past: Any,
    images: dict[str, torch.Tensor],
    extra: dict[str, Any],
) -> tuple[torch.Tensor, Any]:
    """One cached step: the prefill (``past is None``, which reads the images) or one new token per row."""
    position_ids = positions_from_mask(attention_mask)[:, -step_ids.shape[1] :]
    out = model(
        input_ids=step_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=past,
        use_cache=True,
        **(images if past is None else {}),
        **extra,
    )
    return out.logits[:, -1, :], out.cache


def _forward_full(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: dict[str, torch.Tensor],
    extra: dict[str, Any],
) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        **images,
        **extra,
    )
    return out.logits[:, -1, :]


