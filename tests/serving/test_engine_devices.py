"""The engine on every device present: ``cpu`` always, ``cuda`` when there is one (marked ``gpu``, skipped
otherwise; ``bench/gpu_check.sh`` runs them on a GPU machine). On each: greedy output of a mixed batch (v1 and a
transformers family, base rows and two adapters: decode steps run dense on a GPU, grouped on a CPU) equals the family's one-request reference on the same device, seeded sampling
repeats, and every tensor the engine's forwards create lives on the configured device (a dispatch-mode record of
each op's outputs); the same for a batch using every per-row sampling feature at once (top-k / top-p, penalties,
logit_bias, logprobs, a JSON grammar)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.grammar import json_grammar
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.lora_batch import lora_targets
from tests.devices import DEVICES, DeviceRecorder


def _requests(adapter: Path | None, other: Path | None = None) -> list[EngineRequest]:
    """Three rows: on ``adapter``, on the base model, on ``other`` (``adapter`` when None)."""
    def req(i: int, image: bool, tokens: int, a: Path | None) -> EngineRequest:
        parts: list = [TextPart("tell me about thing " + "and this " * i)]
        if image:
            parts.insert(0, ImagePart(Image.new("RGB", (56, 42), (40 * i, 90, 160))))
        return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=tokens),
                             adapter_id=a.name if a else None, adapter_locator=str(a) if a else None)

    return [req(0, True, 6, adapter), req(2, False, 4, None), req(1, True, 5, other or adapter)]


def _reference(engine: ServingEngine, request: EngineRequest, adapter: Path | None) -> list[int]:
    """``qwenvl_core.generation.generate`` of this request alone on the engine's device, with peft's LoRA."""
    from peft import PeftModel

    family = engine.family
    model = family.forward_contract(family.load_model(engine.config_dir, device=engine.device)).eval()
    if request.adapter_id is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    enc = engine.processor.encode_chat(request.messages)
    params = SamplingParams(max_new_tokens=request.params.max_new_tokens,
                            stop_token_ids=tuple(family.stop_token_ids(engine.processor)),
                            suppress_token_ids=engine.processor.image_token_ids)
    return generate(model, [enc.input_ids], pad_token_id=engine.processor.pad_token_id, params=params,
                    vision=enc.vision)[0].token_ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["qwen-vl", "qwen2.5-vl"])
def test_engine_on_device_matches_the_reference_and_keeps_its_tensors_there(device, which, tiny_model_dir,
                                                                            tiny_dirs, adapter_dirs, tmp_path):
    from tests.serving.conftest import make_family_adapter as _adapter

    model_dir = tiny_model_dir if which == "qwen-vl" else tiny_dirs[which]
    adapter = adapter_dirs[0] if which == "qwen-vl" else _adapter(which, model_dir, tmp_path / "a", seed=3)
    other = adapter_dirs[1] if which == "qwen-vl" else _adapter(which, model_dir, tmp_path / "b", seed=4)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(device=device, max_total_tokens=512))
    engine.config_dir = model_dir
    try:
        stacks = {name: (a.data_ptr(), bt.data_ptr()) for name, (a, bt) in engine.adapter_slots._stacks.items()}
        assert set(stacks) == set(lora_targets(engine.model, engine.family))  # allocated before the KV cache
        assert {t.device.type for pair in engine.adapter_slots._stacks.values() for t in pair} == {
            torch.device(device).type}
        assert engine.stats.adapter_slot_bytes == engine.adapter_slots.nbytes > 0
        assert engine.adapter_slots.dense_decode == (torch.device(device).type == "cuda")
        requests = _requests(adapter, other)
        recorder = DeviceRecorder(device)
        seqs = [engine._prepare(r, time.perf_counter()) for r in requests]
        with recorder:  # the model thread's work, run here step by step so the recorder sees it
            engine._step(seqs)
            steps = 1
            while engine._batch is not None:
                engine._step([])
                steps += 1
        assert not recorder.left, f"ops computed off {device} from its tensors: {sorted(set(recorder.left))}"
        print(f"{device}: {len(recorder.reads)} device-to-host reads in {steps} engine steps")
        assert all(s.state.done for s in seqs) and engine.adapter_slots.in_use == 0
        async def run() -> list:
            return await asyncio.gather(*(engine.generate(r) for r in requests))

        results = asyncio.run(run())
        assert engine.stats.max_adapters_in_forward == 2
        assert [r.token_ids for r in results] == [
            _reference(engine, r, Path(r.adapter_locator) if r.adapter_locator else None) for r in requests]
        assert {engine.kv.keys[0].device.type, engine._rows.text_pos.device.type} == {torch.device(device).type}
        assert {name: (a.data_ptr(), bt.data_ptr()) for name, (a, bt) in engine.adapter_slots._stacks.items()} == \
            stacks  # adapters were copied into the slots, nothing allocated
        sampled = [asyncio.run(engine.generate(EngineRequest(requests[1].messages, SamplingParams(
            max_new_tokens=5, do_sample=True, temperature=0.9, seed=7)))).token_ids for _ in range(2)]
        assert sampled[0] == sampled[1]
    finally:
        engine.close()


def _feature_requests(adapter: Path) -> list[EngineRequest]:
    """A batch whose rows use every per-row sampling feature: seeded top-k / top-p with penalties and logprobs,
    top-p with a logit_bias and a stop string, greedy under a JSON grammar, an image row on an adapter."""
    def req(text: str, params: SamplingParams, image: bool = False, with_adapter: bool = False) -> EngineRequest:
        parts: list = [TextPart(text)]
        if image:
            parts.insert(0, ImagePart(Image.new("RGB", (56, 42), (200, 90, 40))))
        a = adapter if with_adapter else None
        return EngineRequest([Message(role="user", parts=parts)], params,
                             adapter_id=a.name if a else None, adapter_locator=str(a) if a else None)

    return [
        req("tell me a story", SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=0.9,
                                              seed=3, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2)),
        req("and another one", SamplingParams(max_new_tokens=5, do_sample=True, top_p=0.8, seed=4,
                                              logit_bias=((10, 5.0), (11, -100.0)), stop_strings=("zz",))),
        req("answer in json", SamplingParams(max_new_tokens=8, grammar=json_grammar(None), frequency_penalty=1.0,
                                             logprobs=0)),
        req("what is this", SamplingParams(max_new_tokens=4, logit_bias=((12, 2.0),)), image=True, with_adapter=True),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["qwen-vl", "qwen2.5-vl"])
def test_every_sampling_feature_runs_on_the_device_and_repeats_with_its_seeds(device, which, tiny_model_dir, tiny_dirs,
                                                                              adapter_dirs, tmp_path):
    from tests.serving.conftest import make_family_adapter as _adapter

    model_dir = tiny_model_dir if which == "qwen-vl" else tiny_dirs[which]
    adapter = adapter_dirs[0] if which == "qwen-vl" else _adapter(which, model_dir, tmp_path / "a", seed=3)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(device=device, max_total_tokens=512))
    try:
        requests = _feature_requests(adapter)
        seqs = [engine._prepare(r, time.perf_counter()) for r in requests]
        recorder = DeviceRecorder(device)
        with recorder:
            engine._step(seqs)
            while engine._batch is not None:
                engine._step([])
        assert not recorder.left, f"ops computed off {device} from its tensors: {sorted(set(recorder.left))}"
        assert all(s.state.done and not s.failed for s in seqs)
        assert [len(s.state.logprobs) for s in seqs] == [len(s.state.tokens) if s.request.params.logprobs is not None
                                                         else 0 for s in seqs]
        assert 11 not in seqs[1].state.tokens  # its -100
        assert all(c.device.type == torch.device(device).type for s in seqs if (c := s.state.counts) is not None)

        async def run() -> list:
            return await asyncio.gather(*(engine.generate(r) for r in requests))

        first, second = asyncio.run(run()), asyncio.run(run())
        assert [r.token_ids for r in first] == [r.token_ids for r in second] == [s.state.tokens for s in seqs]
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_index_past_the_visible_ones_is_named_as_such():
    """``serve_device`` / a job's device ``cuda:N`` beyond this process's GPUs: a clear error naming the setting and
    what is visible, at configuration time (before: CUDA's "invalid device ordinal" at the first tensor)."""
    from qwenvl_core.devices import checked_device
    from qwenvl_core.errors import QwenVLError

    count = torch.cuda.device_count()
    with pytest.raises(QwenVLError, match=rf"serve_device 'cuda:{count}': this process sees {count} CUDA device"):
        checked_device(f"cuda:{count}", "serve_device")
    assert checked_device(f"cuda:{count - 1}", "serve_device") == torch.device("cuda", count - 1)
