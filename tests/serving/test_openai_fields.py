"""The OpenAI chat fields people use, through the official ``openai`` client against the product's chat app
(``standalone_app`` under uvicorn) on the tiny random model: logprobs / top_logprobs (values checked against the
model's own forward), n choices (seed + i), presence / frequency penalties (OpenAI's formula, checked on
crafted logits), logit_bias (a ban and an exclusive token), stop, max_completion_tokens,
stream_options.include_usage, system_fingerprint, response_format (JSON object / JSON schema through llguidance:
the output parses and validates), and every field we do not implement refused with a 400 naming it."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client import CollectorRegistry

from qwenvl_core.conversation import text_message
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import RowState, SamplingParams, advance_row, next_tokens
from qwenvl_core.serving.chat import AdapterLocator, InProcessBackend, system_fingerprint
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from qwenvl_core.serving.metrics import ServingMetrics
from qwenvl_core.vocabulary import vocabulary
from service.routes.chat import standalone_app
from tests.fixtures.net import free_port, wait_for_port

BASE = "qwen-vl-tiny"
ADAPTER = f"ft:{BASE}:tenant-a:fields:job1"
KEY = "key-a"
HELLO = [{"role": "user", "content": "Describe the picture in a few words."}]
ANSWER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
                 "required": ["ok", "n"], "additionalProperties": False}


@dataclass
class Server:
    url: str
    engine: ServingEngine


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_dirs: list[Path]) -> Iterator[Server]:
    adapter_dir = adapter_dirs[0]  # the serving tests' session adapters: no extra build in a full run
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_batch_size=16),
                                          metrics=ServingMetrics(CollectorRegistry()))

    def resolve(model_id: str, tenant_id: str) -> AdapterLocator | None:
        if model_id == ADAPTER and tenant_id == "tenant-a":
            return AdapterLocator(adapter_id=ADAPTER, base_model=BASE, uri=str(adapter_dir))
        return None

    app = standalone_app(InProcessBackend({BASE: engine}), adapter_resolver=resolve, api_keys={KEY: "tenant-a"})
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield Server(f"http://127.0.0.1:{port}", engine)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.close()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": HELLO, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ----- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("parallel_tool_calls", True), ("made_up_field", 1),
])
def test_fields_we_do_not_implement_are_refused_naming_the_field(server, field, value):
    response = _post(server, {field: value, "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


def test_a_message_field_we_do_not_implement_is_refused_and_null_fields_ask_for_nothing(server):
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [*HELLO, {"role": "assistant", "content": "ok", "tool_calls": calls}, *HELLO]
    response = _post(server, {"messages": messages, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].tool_calls"
    replayed = [*HELLO, {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None}, *HELLO]
    assert _post(server, {"messages": replayed, "tools": None, "logit_bias": None, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object"}}, "response_format"),  # OpenAI: the messages must say "json"
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"logit_bias": {"hello": 5}}, "logit_bias"),
    ({"logit_bias": {"-3": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"1000000": 1}}, "logit_bias"),  # beyond the model's vocabulary: the engine says so
    ({"seed": 2**64}, "seed"),  # OpenAI's seed is a 64-bit signed integer (torch's generator takes < 2**64)
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
])
def test_inconsistent_or_out_of_range_values_are_refused_naming_the_field(server, body, param):
    response = _post(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("part", "says"), [
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "type 'input_audio' is not supported"),
    ({"text": "no type"}, "has no type"),
])
def test_a_content_part_of_another_type_is_refused_naming_its_type(server, part, says):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    response = _post(server, {"messages": messages, "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages.0.content.1.type" and says in error["message"], error
    assert "'text', 'image_url'" in error["message"]
    wrong = [{"role": "user", "content": [{"type": "text"}]}]  # a known part's own error, not "not a string"
    error = _post(server, {"messages": wrong, "max_tokens": 1}).json()["error"]
    assert error["param"].startswith("messages.0.content.0.") and "Field required" in error["message"], error


def test_extreme_sampling_values_are_answered(server):
    """A top_p that is 0 in float32 keeps the top token; a tiny temperature is greedy; the seeds of n choices stay
    in a torch generator's range up to the largest 64-bit seed."""
    for body in ({"top_p": 1e-300}, {"top_p": 5e-324, "stream": True}, {"temperature": 1e-300},
                 {"seed": 2**63 - 1, "n": 3}, {"seed": -(2**63), "n": 2}):
        response = _post(server, {"max_tokens": 2, **body})
        assert response.status_code == 200, (body, response.text)
        assert "error" not in response.text, (body, response.text)


# ----- logprobs ---------------------------------------------------------------------------------------------------
def _greedy_reference(engine: ServingEngine, messages: list[dict], steps: int, k: int
                      ) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding by full recomputation: each step's top-``k`` (ids, log-probabilities) of the model's
    distribution, image-structure ids excluded (generation never emits them)."""
    ids = engine.processor.encode_conversation([text_message(m["role"], m["content"]) for m in messages],
                                               add_generation_prompt=True).input_ids
    prompt_length, out = len(ids), []
    with torch.no_grad():
        for _ in range(steps):
            batch = torch.tensor([ids])
            logits = engine.model(input_ids=batch, attention_mask=torch.ones_like(batch),
                                  position_ids=torch.arange(len(ids))[None], use_cache=False,
                                  prompt_lengths=torch.tensor([prompt_length])).logits[0, -1].float()
            logits[list(engine.processor.image_token_ids)] = float("-inf")
            top = torch.topk(torch.log_softmax(logits, dim=-1), k)
            out.append((top.indices.tolist(), top.values.tolist()))
            ids.append(top.indices[0].item())
    return out


def test_logprobs_are_the_models_and_come_in_openais_shape(server, client):
    out = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert choice.finish_reason == "length" and len(content) == out.usage.completion_tokens == 6
    assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == choice.message.content
    vocab = vocabulary(server.engine.processor)  # ids past the tokenizer (padded model rows) have no bytes
    for entry, (ids, values) in zip(content, _greedy_reference(server.engine, HELLO, 6, 3), strict=True):
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [vocab.bytes_of(i) for i in ids]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values, abs=1e-4)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
    plain = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_stream_in_the_chunks(client):
    kwargs = {"model": BASE, "messages": HELLO, "max_completion_tokens": 6, "temperature": 0, "logprobs": True}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in plain.choices[0].logprobs.content]
    assert all(t.top_logprobs == [] for t in streamed)


# ----- n, seed, usage, fingerprint --------------------------------------------------------------------------------
def test_n_choices_each_with_seed_plus_i_and_usage_counts_the_prompt_once(client):
    kwargs = {"model": BASE, "messages": HELLO, "max_completion_tokens": 8, "temperature": 1.0}
    many = client.chat.completions.create(**kwargs, n=3, seed=11)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**kwargs, seed=11 + i) for i in range(3)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in many.choices}) > 1  # different seeds sample differently
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens


def test_n_choices_stream_with_their_index_and_a_final_usage_chunk(client):
    kwargs = {"model": BASE, "messages": HELLO, "max_completion_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert {c.system_fingerprint for c in chunks} == {plain.system_fingerprint}


def test_system_fingerprint_names_base_model_and_adapter(client):
    base = [client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=1) for _ in range(2)]
    tuned = client.chat.completions.create(model=ADAPTER, messages=HELLO, max_tokens=1)
    assert base[0].system_fingerprint == base[1].system_fingerprint == system_fingerprint(BASE, None)
    assert tuned.system_fingerprint == system_fingerprint(BASE, ADAPTER) != base[0].system_fingerprint
    assert base[0].system_fingerprint.startswith("fp_")


def test_without_max_tokens_a_long_prompt_gets_the_rest_of_the_context_and_a_short_one_the_default(server, client):
    """No output limit in the request: the server's default (256), cut to what the context leaves after a long
    prompt instead of a 400 about a max_tokens the client never sent; with max_tokens the same prompt is refused."""
    never_stop = {str(i): -100 for i in server.engine.family.stop_token_ids(server.engine.processor)}
    limit = server.engine.config.max_total_tokens
    def prompt_tokens(repeats: int) -> int:
        text = "tell me about these words " * repeats
        return len(server.engine.processor.encode_conversation([text_message("user", text)],
                                                               add_generation_prompt=True).input_ids)

    per_repeat = prompt_tokens(101) - prompt_tokens(100)
    repeats = 100 + (limit - 100 - prompt_tokens(100)) // per_repeat  # a prompt a little under the limit
    long = [{"role": "user", "content": "tell me about these words " * repeats}]
    out = client.chat.completions.create(model=BASE, messages=long, temperature=0, logit_bias=never_stop)
    assert limit - 256 < out.usage.prompt_tokens < limit
    assert out.choices[0].finish_reason == "length" and out.usage.total_tokens == limit
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=BASE, messages=long, temperature=0, max_tokens=256)
    assert refused.value.body["param"] == "max_tokens"
    short = client.chat.completions.create(model=BASE, messages=HELLO, temperature=0, logit_bias=never_stop)
    assert short.usage.completion_tokens == 256 and short.choices[0].finish_reason == "length"


def test_stop_list_and_max_completion_tokens(client):
    kwargs = {"model": BASE, "messages": HELLO, "temperature": 0}
    full = client.chat.completions.create(**kwargs, max_completion_tokens=12).choices[0]
    assert full.finish_reason == "length"
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(**kwargs, max_completion_tokens=12, stop=["\u2603", stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[: text.index(stop)]
    same = client.chat.completions.create(**kwargs, max_tokens=5, max_completion_tokens=5)
    assert same.usage.completion_tokens == 5


# ----- penalties --------------------------------------------------------------------------------------------------
def _row(tokens: list[int], **params: float) -> RowState:
    state = RowState(params=SamplingParams(logprobs=0, **params), generator=None)
    state.tokens = list(tokens)
    return state


def test_penalties_follow_openais_formula_per_row():
    logits = torch.zeros(3, 8)
    logits[:, 3] = 2.0  # token 3 leads by 2.0; it appeared twice in every row's output so far
    logits[:, 5] = 1.0
    rows = [_row([3, 3, 1]), _row([3, 3, 1], frequency_penalty=0.6), _row([3, 3, 1], presence_penalty=1.5)]
    chosen = next_tokens(logits, rows)
    assert chosen == [3, 5, 5]  # 2.0 - 2 * 0.6 = 0.8 < 1.0; 2.0 - 1.5 = 0.5 < 1.0
    expected = logits.clone()
    expected[1, 3] -= 1.2
    expected[1, 1] -= 0.6
    expected[2, 3] -= 1.5
    expected[2, 1] -= 1.5
    for row, state in enumerate(rows):
        assert state.pending_logprobs.logprob == pytest.approx(
            float(torch.log_softmax(expected[row], dim=-1)[chosen[row]]))
    negative = [_row([4, 4], frequency_penalty=-2.0)]  # a negative penalty favours repeating: 0 + 4 > 2
    assert next_tokens(logits[:1], negative) == [4]


def _token_of(server: Server, data: bytes) -> int:
    return vocabulary(server.engine.processor).tokens.index(data)


def test_logit_bias_bans_a_token_or_makes_it_the_only_choice(server, client):
    """OpenAI's logit_bias: -100 keeps the greedy choice off a token, +100 makes a token win every step (the random
    model's logits are small), in streams too; the other requests of a batch are unaffected."""
    kwargs = {"model": BASE, "messages": HELLO, "max_completion_tokens": 4, "temperature": 0, "logprobs": True}
    plain = client.chat.completions.create(**kwargs).choices[0]
    first = _token_of(server, bytes(plain.logprobs.content[0].bytes))
    banned = client.chat.completions.create(**kwargs, logit_bias={str(first): -100}).choices[0]
    assert bytes(banned.logprobs.content[0].bytes) != bytes(plain.logprobs.content[0].bytes)
    letter = _token_of(server, b"a")
    forced = client.chat.completions.create(**kwargs, logit_bias={str(letter): 100, str(first): -1.5}).choices[0]
    assert forced.message.content == "aaaa" and forced.finish_reason == "length"
    streamed = client.chat.completions.create(**kwargs, logit_bias={str(letter): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "aaaa"
    assert client.chat.completions.create(**kwargs).choices[0].message.content == plain.message.content


def test_logit_bias_is_added_per_row_and_never_brings_a_suppressed_token_back():
    logits = torch.zeros(3, 8)
    logits[:, 2] = 1.0
    rows = [RowState(params=SamplingParams(logit_bias=((5, 3.0),)), generator=None),
            RowState(params=SamplingParams(logit_bias=((2, -100.0), (6, 0.5))), generator=None),
            RowState(params=SamplingParams(logit_bias=((4, 100.0),), suppress_token_ids=(4,)), generator=None)]
    assert next_tokens(logits, rows) == [5, 6, 2]
    sampled = RowState(params=SamplingParams(do_sample=True, seed=0, logit_bias=((7, 100.0),)), generator=None)
    sampled.generator = torch.Generator().manual_seed(0)
    assert {next_tokens(logits[:1], [sampled])[0] for _ in range(10)} == {7}
    for bad in [((1, 100.5),), ((-1, 1.0),), ((3, 1.0), (3, 2.0))]:
        with pytest.raises(QwenVLError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_logprobs_records_follow_the_tokens_taken_not_the_stop_token():
    state = RowState(params=SamplingParams(logprobs=1, stop_token_ids=(7,), max_new_tokens=5), generator=None)
    logits = torch.zeros(1, 8)
    logits[0, 2] = 3.0
    advance_row(state, next_tokens(logits, [state])[0], None)
    logits[0, 7] = 9.0
    advance_row(state, next_tokens(logits, [state])[0], None)
    assert state.tokens == [2] and [s.token_id for s in state.logprobs] == [2] and state.finish_reason == "stop"


# ----- response_format ----------------------------------------------------------------------------------------------
def _valid(value: object) -> bool:
    return (isinstance(value, dict) and set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
            and isinstance(value["n"], int))


def test_json_schema_output_parses_and_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": ANSWER_SCHEMA}}
    out = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=40, temperature=1.0,
                                         seed=0, n=4, response_format=fmt)
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert _valid(json.loads(choice.message.content)), choice.message.content
    greedy = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=40, temperature=0,
                                            response_format=fmt, stream=True)
    assert _valid(json.loads("".join(c.choices[0].delta.content or "" for c in greedy if c.choices)))
    text = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=8, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].finish_reason == "length"


def test_json_object_output_is_a_json_object(client):
    messages = [{"role": "user", "content": "Answer in JSON: which shapes are there?"}]
    # The random model closes its object within 64 tokens in about one sample of five: 16 samples (seeds 0..15)
    kwargs = {"model": BASE, "messages": messages, "max_completion_tokens": 64, "temperature": 0.7, "n": 8,
              "response_format": {"type": "json_object"}}
    choices = [c for seed in (0, 8) for c in client.chat.completions.create(**kwargs, seed=seed).choices]
    finished = [c for c in choices if c.finish_reason == "stop"]
    assert finished
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in choices:
        assert choice.message.content.startswith("{")


class _Processor:
    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer


def test_vocabulary_and_grammar_for_a_transformers_tokenizer(tmp_path):
    """The newer families' byte-level BPE (GPT-2 byte alphabet, added special tokens): token bytes rebuild the
    text, and a JSON-schema grammar over that vocabulary only lets valid JSON through, then a stop id."""
    from transformers import AutoTokenizer

    from qwenvl_core.grammar import GrammarConstraint, allowed_tokens, json_grammar
    from qwenvl_core.models.hf_vl.tokenizer import TINY_ORDINARY_TOKENS, write_tokenizer
    from qwenvl_core.models.qwen2_vl.family import SPEC

    write_tokenizer(SPEC, tmp_path, TINY_ORDINARY_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    vocab = vocabulary(_Processor(tokenizer))
    text = "a red circle, 图片里有什么？ é\n"
    assert b"".join(vocab.bytes_of(i) for i in tokenizer.encode(text, add_special_tokens=False)) == text.encode()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert vocab.bytes_of(im_end) == b"<|im_end|>" and im_end in vocab.special
    for seed in range(3):
        constraint, out, rng = GrammarConstraint(json_grammar(ANSWER_SCHEMA), vocab, [im_end]), b"", random.Random(seed)
        for _ in range(64):
            allowed = allowed_tokens([constraint], len(vocab) + 7, torch.device("cpu"))[0]
            assert not allowed[len(vocab) :].any()
            token = rng.choice(allowed.nonzero().flatten().tolist())
            if token == im_end:
                break
            constraint.consume(token)
            out += vocab.bytes_of(token)
        assert _valid(json.loads(out)), out
