"""``bench/step_ops.py`` on the tiny preset, so the benchmark cannot rot, and the op counts it exists for.

On a GPU a decode step is bound by the ops it launches (docs/benchmarks.md), and these sessions rarely have one; so
the GPU path's claims are kept as op counts, which are exact and the same on any machine: a decode step that mixes
adapters (dense LoRA decode, what CUDA takes) dispatches about as many ops as one with a single adapter, and the
engine over requests of varied lengths dispatches fewer ops and forwards per generated token than static batches.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
PRESET = "qwen-vl-tiny"


@pytest.fixture(scope="module")
def step_ops() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))  # the script imports its siblings, as when run
        import step_ops

        yield step_ops
    for name in ("step_ops", "serving_throughput", "revisions"):
        sys.modules.pop(name, None)


def test_a_mixed_adapter_decode_step_costs_about_what_a_single_adapter_step_does(step_ops):
    counts = step_ops.count(PRESET, adapters=8)
    base, single, mixed = (counts[name]["ops"] for name in ("base", "single", "mixed"))
    assert 0 < base < single, counts
    assert mixed <= 1.1 * single, counts  # 8 adapters in one step: a mask per target, not a gather and a bmm each
    # what ran (the CPU's computing ops here, CUDA kernels on a GPU), per layer of qwen-vl-tiny's 2 (targets c_attn,
    # attn.c_proj, w1, w2; w1 / w2 siblings): a target costs a step 2 kernels with one adapter (x·Aᵀ, then ·(B·s)ᵀ
    # accumulated into the layer's output) and 3 with mixed adapters (the rank mask between); the sibling pair takes
    # its x·Aᵀ (and mask) from one product: one adapter 2 + 2 + 3, mixed 3 + 3 + 4 (the adapters' rank 8 is below
    # the slots' 64: the pair shares at any rank)
    kernels = {name: counts[name]["kernels"] for name in ("base", "single", "mixed")}
    assert kernels["single"] - kernels["base"] == 2 * 7 and kernels["mixed"] - kernels["base"] == 2 * 10, kernels
    # a join's prefill forward of rows on two adapters and the base, interleaved: the decode's dense path (the rows
    # multiplied by every slot, a mask over each row's tokens, made once per forward: + 1), not a gather, two
    # batched matmuls and a scatter per target (2 x 20 before it: 122 - 82 on the same counts)
    joins = {name: counts[name]["kernels"] for name in ("join-base", "join-mixed")}
    assert joins["join-mixed"] - joins["join-base"] == 2 * 10 + 1, joins
    workload = counts["workload"]
    static = step_ops.static_workload(PRESET)
    # rows join a running batch a few at a time (admitted at every step instead, as before: 0.105 forwards per token)
    assert workload["forwards"] < 0.1, counts
    assert workload["ops"] < static, (workload, static)


def test_fixed_shape_steps_take_each_sibling_groups_lora_from_one_product(step_ops):
    """``--decode-graphs static``: the steps CUDA graphs replay. qwen-vl-tiny has 2 layers, 4 LoRA targets each
    (c_attn, attn.c_proj, w1, w2), w1 / w2 siblings: a LoRA step adds per layer 3 kernels a target (x·Aᵀ, the rank
    mask, ·(B·s)ᵀ accumulated), less 2 for the sibling pair (one x·Aᵀ and one mask for both): 10, not 12."""
    counts = step_ops.count(PRESET, adapters=4, workload_too=False, decode_graphs="static")
    kernels = {name: counts[name]["kernels"] for name in ("base", "single", "mixed")}
    assert kernels["single"] == kernels["mixed"], kernels  # every slot at full rank, whatever the rows use
    assert kernels["mixed"] - kernels["base"] == 2 * 10, kernels
