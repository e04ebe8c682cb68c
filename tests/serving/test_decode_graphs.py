"""Fixed-shape decode steps (``decode_graphs``): what the engine generates with them is what it generates without,
for every family, on every device present (``static`` on the CPU: the same shapes without graphs; ``cuda``:
replayed CUDA graphs, marked ``gpu``). The batch mixes base rows and two adapters, rows of different lengths that come and go (padding
rows, several buckets of rows and of attended keys) and a long prompt prefilled in chunks into the top slot while
the others decode; and the fixed-shape step reads nothing back from the device (a read cannot be captured)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from tests.conftest import HF_FAMILIES
from tests.devices import DEVICES


def _requests(adapters: list[Path]) -> list[EngineRequest]:
    def req(i: int, tokens: int, adapter: Path | None, image: bool = False, words: int = 1) -> EngineRequest:
        parts: list = [TextPart(f"tell me about thing {i} " + "and this " * words)]
        if image:
            parts.insert(0, ImagePart(Image.new("RGB", (56, 42), (40 * i, 90, 160))))
        return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=tokens),
                             adapter_id=adapter.name if adapter else None,
                             adapter_locator=str(adapter) if adapter else None)

    a, b = adapters[:2]
    return [req(0, 9, a, image=True), req(1, 3, None), req(2, 12, b, words=6), req(3, 5, a), req(4, 7, None),
            req(5, 20, b, words=90)]  # the last: ~300 tokens, prefilled in chunks of 64 beside the others' decode


# ops that read a device value back (or size their output by one), which a CUDA graph cannot capture
_READS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
          torch.ops.aten._unique2, torch.ops.aten.repeat_interleave}
# indexing ops, which read a boolean index back (its nonzero runs inside the kernel, unseen by a dispatch mode)
_INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_,
             torch.ops.aten._index_put_impl_}


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func.overloadpacket not in _READS, f"a fixed-shape step ran {func}, which reads a device value"
        if func.overloadpacket in _INDEXING:
            boolean = [i for i in args[1] if i is not None and i.dtype == torch.bool]
            assert not boolean, f"a fixed-shape step ran {func} with a boolean index, which reads a device value"
        return func(*args, **(kwargs or {}))


def _generate(model_dir: Path, config: EngineConfig, requests: list[EngineRequest]) -> tuple[list, object]:
    engine = ServingEngine.from_model_dir(model_dir, config)
    graphs = engine._graphs
    if graphs is not None:
        forward = graphs._forward
        graphs.sibling_calls = graphs.sibling_products = 0
        product = engine.lora._sibling_product

        def checked(*args: object) -> torch.Tensor:
            with _NoHostReads():
                return forward(*args)

        def counted(*args: object) -> torch.Tensor:  # a sibling target's LoRA: its group's product made, or reused
            before = engine.lora._shared
            out = product(*args)
            graphs.sibling_calls += 1
            graphs.sibling_products += engine.lora._shared is not before
            return out

        graphs._forward = checked
        engine.lora._sibling_product = counted
    try:
        async def run() -> list:
            return await asyncio.gather(*(engine.generate(r) for r in requests))

        return [r.token_ids for r in asyncio.run(run())], graphs
    finally:
        engine.close()


@pytest.mark.parametrize("family_name", ["qwen-vl", *HF_FAMILIES])
@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decode_steps_generate_what_the_usual_steps_do(device, family_name, tiny_model_dir, adapter_dirs,
                                                                   tiny_dirs, family_adapter_dirs):
    if family_name == "qwen-vl":
        model_dir, adapters = tiny_model_dir, adapter_dirs
    else:  # M-RoPE positions [3, rows, 1], transformers' own attention and norms
        model_dir, adapters = tiny_dirs[family_name], family_adapter_dirs[family_name]
    requests = _requests(adapters)
    base = dict(device=device, max_total_tokens=512, max_batch_size=8, prefill_chunk_tokens=64)
    usual, _ = _generate(model_dir, EngineConfig(**base), requests)
    mode = "cuda" if torch.device(device).type == "cuda" else "static"
    fixed, graphs = _generate(model_dir, EngineConfig(**base, decode_graphs=mode, decode_graph_attend_step=32),
                              requests)
    assert fixed == usual
    assert all(len(ids) > 0 for ids in fixed)
    shapes = set(graphs._buffers)
    assert graphs.steps > 10 and len({s.rows for s in shapes}) > 1 and len({s.attend for s in shapes}) > 1, shapes
    assert any(s.lora for s in shapes)
    # the adapters' rank 8 under slots of rank 64: the steps read the stacks cut to 8, not 64
    assert {s.rank for s in shapes if s.lora} == {8} and {s.rank for s in shapes if not s.lora} <= {0}
    width = 8 * (graphs.slots.slots + 1)
    assert all(b.rank_mask.shape[1] == width for s, b in graphs._buffers.items() if s.lora)
    # sibling targets (v1: w1 / w2; the others: q / k / v, gate / up) shared one product per group and step
    members = 2 if family_name == "qwen-vl" else 2.5  # targets per group, on average
    assert graphs.sibling_calls > 0 and graphs.sibling_products * members == graphs.sibling_calls
    if mode == "cuda":
        assert graphs.captured == len(shapes)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decode_steps_on_a_4bit_base_generate_what_the_usual_steps_do(device, tiny_model_dir,
                                                                                adapter_dirs):
    """A Q-LoRA replica's base (bitsandbytes' 4-bit layers, ``quantization="4bit"``) in fixed-shape steps: the same
    tokens as its usual steps, mixed adapters and base rows; on CUDA every shape captured (bitsandbytes' dequantize
    and GEMV kernels inside the graph)."""
    requests = _requests(adapter_dirs)
    base = dict(device=device, max_total_tokens=512, max_batch_size=8, prefill_chunk_tokens=64, quantization="4bit")
    usual, _ = _generate(tiny_model_dir, EngineConfig(**base), requests)
    mode = "cuda" if torch.device(device).type == "cuda" else "static"
    fixed, graphs = _generate(tiny_model_dir, EngineConfig(**base, decode_graphs=mode, decode_graph_attend_step=32),
                              requests)
    assert fixed == usual
    assert graphs.steps > 10 and any(s.lora for s in graphs._buffers)
    if mode == "cuda":
        assert graphs.captured == len(graphs._buffers)


def test_a_fixed_shape_step_cuts_the_adapter_slots_to_the_batchs_rank_bucket(tiny_model_dir):
    """A step reads the slots' stacks cut to the batch's largest rank rounded up to a power of two (at most the
    slots' rank), so a deployment of rank-8 adapters on slots of 64 does not read 8 times what it uses; a step
    without adapters has no LoRA and rank 0."""
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", decode_graphs="static",
                                                                       max_lora_rank=48))
    try:
        graphs, target = engine._graphs, next(iter(engine.adapter_slots.stacks()))
        ranks = {r: graphs.shape_for(1, 5, (target,), r).rank for r in (1, 3, 8, 9, 33, 48)}
        assert ranks == {1: 1, 3: 4, 8: 8, 9: 16, 33: 48, 48: 48}
        assert graphs.shape_for(1, 5, (), 0).rank == 0
    finally:
        engine.close()


def test_decode_graphs_are_refused_where_they_cannot_run(tiny_model_dir):
    with pytest.raises(QwenVLError, match="CUDA graphs need a CUDA device"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", decode_graphs="cuda"))
    with pytest.raises(QwenVLError, match="expected 'off', 'cuda' or 'static'"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", decode_graphs="always"))


def test_a_step_that_cannot_be_captured_turns_graphs_off_and_its_rows_go_on(tiny_model_dir, adapter_dirs, caplog):
    """A capture that fails (an op CUDA graphs refuse, on some model or driver) costs the engine its graphs, not its
    requests: that step and every later one run the usual way, and the rows generate what they would have."""
    requests = _requests(adapter_dirs)
    base = dict(device="cpu", max_total_tokens=512, max_batch_size=8, prefill_chunk_tokens=64)
    usual, _ = _generate(tiny_model_dir, EngineConfig(**base), requests)
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(**base, decode_graphs="static",
                                                                       decode_graph_attend_step=32))
    graphs = engine._graphs
    graphs.capture = True  # as on a GPU, where this capture fails

    def refused(_buffers: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = refused
    try:
        async def run() -> list:
            return await asyncio.gather(*(engine.generate(r) for r in requests))

        with caplog.at_level("WARNING", logger="qwenvl_core.serving.engine"):
            results = asyncio.run(run())
    finally:
        engine.close()
    assert [r.token_ids for r in results] == usual
    assert engine._graphs is None and graphs.steps == 1 and not graphs._buffers[next(iter(graphs._buffers))].graph
    assert "decodes without CUDA graphs from now on" in caplog.text and "operation not permitted" in caplog.text
