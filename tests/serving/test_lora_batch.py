"""GroupedLora's batched mixed-adapter path against a per-row reference ``x·Wᵀ + x·A_iᵀ·B_iᵀ·s_i``.

Small real ``nn.Linear`` layers and random adapters (no model files): mixed rows with rows on the base model, uneven
groups (padding), adapters of different ranks and modules, prefill ``[B, T, in]`` and decode ``[B, 1, in]`` shapes,
float32 and bfloat16; through ``build_plan`` (stacked here) and through the engine's ``AdapterSlots`` (views of
the device slots, including a window that spans a resident adapter no row uses).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.adapter_slots import AdapterSlots, sibling_groups
from qwenvl_core.serving.lora_batch import GroupedLora, LoraWeights, build_plan, row_layout, sibling_views
from tests.devices import DEVICES

IN, HIDDEN, OUT = 24, 40, 16


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _adapter(seed: int, rank: int, modules: tuple[str, ...] = ("up", "down")) -> tuple[LoraWeights, dict]:
    """A LoraWeights (``(B·s)ᵀ``: B with its scaling folded in and transposed, as load_lora_weights stores it) and its
    raw (A, B, s)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"up": (IN, HIDDEN), "down": (HIDDEN, OUT)}
    raw, folded = {}, {}
    for name in modules:
        fan_in, fan_out = shapes[name]
        a, b = torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)
        scale = 2.0 / rank
        raw[name] = (a, b, scale)
        folded[name] = (a, (b * scale).T.contiguous())
    return LoraWeights(adapter_id=f"a{seed}", modules=folded, rank=rank), raw


def _reference(model: _Tiny, x: torch.Tensor, raws: list[dict | None]) -> torch.Tensor:
    """Row by row, in float64: each layer's base output plus its row's ``x·Aᵀ·Bᵀ·s``."""
    rows = []
    for i, raw in enumerate(raws):
        h = x[i : i + 1].double()
        for name in ("up", "down"):
            layer = getattr(model, name)
            y = h @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)
            if raw is not None and name in raw:
                a, b, scale = raw[name]
                y = y + (h @ a.double().T) @ b.double().T * scale
            h = torch.tanh(y) if name == "up" else y
        rows.append(h)
    return torch.cat(rows)


def _round(raw: dict, dtype: torch.dtype) -> dict:
    """The raw weights as the plan holds them in ``dtype`` (the reference then differs only by arithmetic)."""
    return {name: (a.to(dtype), (b * s).to(dtype), 1.0) for name, (a, b, s) in raw.items()}


def _check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype is torch.float32:
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    else:  # bf16 activations between the layers: relative to the outputs' range
        torch.testing.assert_close(out.double(), expected, atol=0.03 * float(expected.abs().max()), rtol=0.03)


# rows: index into the adapters (None: base model); uneven groups so the padded block has padding
MIXES = {
    "mixed-with-base": [0, None, 2, 0, 1, None, 2, 2, 3],
    "one-adapter-some-base": [None, 1, 1, None],
    "one-adapter-every-row": [2, 2, 2],
    "every-row-its-own": [3, 2, 1, 0],
}


@pytest.fixture(scope="module")
def adapters() -> list[tuple[LoraWeights, dict]]:
    # ranks 4 / 8 / 2, and one adapter on "up" only (zero delta on "down")
    return [_adapter(1, 4), _adapter(2, 8), _adapter(3, 2), _adapter(4, 4, ("up",))]


@pytest.mark.parametrize("dense", [False, True], ids=["grouped", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [7, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("mix", list(MIXES), ids=list(MIXES))
def test_build_plan_matches_per_row_reference(adapters, mix, tokens, dtype, dense):
    torch.manual_seed(0)
    model = _Tiny().to(dtype)
    picks = MIXES[mix]
    weights = [None if p is None else LoraWeights(adapters[p][0].adapter_id, {
        n: (a.to(dtype), b.to(dtype)) for n, (a, b) in adapters[p][0].modules.items()}, adapters[p][0].rank)
        for p in picks]
    # the same LoraWeights object for the same adapter: build_plan stacks distinct adapters once
    by_pick = {}
    weights = [None if p is None else by_pick.setdefault(p, w) for p, w in zip(picks, weights, strict=True)]
    x = torch.randn(len(picks), tokens, IN).to(dtype)
    lora = GroupedLora(model)
    plan = build_plan(weights, dense=dense)
    assert (plan.dense is not None) == (dense and plan.layout.groups > 1)  # (decode forwards then take it)
    with torch.inference_mode(), lora.activate(plan):
        out = model(x)
    expected = _reference(model, x, [None if p is None else _round(adapters[p][1], dtype) for p in picks])
    _check(out, expected, dtype)
    lora.remove_hooks()
    with torch.inference_mode():
        assert not torch.allclose(model(x).double(), expected, atol=1e-3)  # the adapters do change the output


@pytest.mark.parametrize("dense", [False, True], ids=["grouped", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [5, 1], ids=["prefill", "decode"])
def test_adapter_slots_plan_matches_per_row_reference(adapters, tokens, dtype, dense):
    """The engine's path: plans are views of the device slots. Slots 1..4 hold adapters 0..3; the batch uses
    slots 2 and 4, so the plan's window (2..4) spans slot 3, resident but used by no row: it must add nothing
    (dense: neither must slots 1 and 5, outside the window)."""
    torch.manual_seed(1)
    model = _Tiny().to(dtype)
    slots = AdapterSlots(5, max_rank=8, targets=_targets(model), device=torch.device("cpu"), dtype=dtype,
                         dense_decode=dense)
    resident = [slots.acquire(weights) for weights, _ in adapters]
    assert resident == [1, 2, 3, 4]
    picks = [3, None, 1, 1, 3, 1, None, 1]
    row_slots = [0 if p is None else resident[p] for p in picks]
    plan = slots.plan(torch.tensor(row_slots), row_slots, [None if p is None else adapters[p][0] for p in picks])
    assert plan is not None and (plan.layout.first, plan.layout.groups) == (2, 3)
    assert (plan.dense is not None) == dense
    x = torch.randn(len(picks), tokens, IN).to(dtype)
    lora = GroupedLora(model)
    with torch.inference_mode(), lora.activate(plan):
        out = model(x)
    expected = _reference(model, x, [None if p is None else _round(adapters[p][1], dtype) for p in picks])
    _check(out, expected, dtype)
    # a row of the batch size the plan was not made for is refused, not silently misapplied
    with torch.inference_mode(), lora.activate(plan), pytest.raises(QwenVLError, match="plan is for 8 rows"):
        model(x[:3])


class _Kernels(TorchDispatchMode):
    """The non-view ops dispatched while active, by name (on a GPU each is a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):  # (a matmul of a [B, 1, in] input is one mm)
            name = func.overloadpacket.__name__
            self.ops["mm" if name == "matmul" else name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [1, 6], ids=["decode", "small-prefill"])
@pytest.mark.parametrize(("picks", "expected"), [
    ([0, 0, 0], {"mm": 1, "addmm_": 1}),  # one adapter on every row: x·Aᵀ, then ·(B·s)ᵀ into the output
    ([0, 1, 0], {"mm": 1, "mul_": 1, "addmm_": 1}),  # dense: x·[Aᵀ…], the rank mask, ·[(B·s)ᵀ…] into it
], ids=["one-adapter", "dense-mixed"])
def test_a_decode_step_or_a_small_prefill_adds_two_or_three_kernels_per_target(adapters, picks, expected, tokens):
    """What a LoRA target costs a forward on a GPU, where an eager forward's time follows its launches: the delta is
    accumulated into the layer's output by the second matmul (``addmm``), not computed apart and then added; a dense
    plan's prefill within ``DENSE_MAX_ENTRIES`` takes the decode's path, its mask over each row's tokens."""
    model = _Tiny()
    weights = [adapters[p][0] for p in picks]
    x = torch.randn(len(picks), tokens, IN)
    with torch.inference_mode():
        base = _Kernels()
        with base:
            model(x)
        lora = _Kernels()
        with GroupedLora(model).activate(build_plan(weights, dense=True)), lora:
            model(x)
    added = lora.ops - base.ops
    assert dict(added) == {name: count * 2 for name, count in expected.items()}  # two targets: up, down


def test_a_prefill_whose_dense_product_would_be_large_gathers_the_rows_per_slot(adapters, monkeypatch):
    """Beyond ``DENSE_MAX_ENTRIES`` ((rows · tokens) x (rank · slots)) a dense plan's prefill gathers the rows per
    slot into one batched pair of matmuls (what every row multiplied by every slot would cost more than); its decode
    steps stay dense. Both give what the dense path gives."""
    from qwenvl_core.serving import lora_batch

    torch.manual_seed(3)
    model = _Tiny()
    weights = [adapters[p][0] for p in (0, 1, 0, 2)]
    plan = build_plan(weights, dense=True)
    width = plan.dense["up"][0].shape[1]
    prefill, decode = torch.randn(len(weights), 5, IN), torch.randn(len(weights), 1, IN)
    outputs, counts = {}, {}
    small, large = lora_batch.DENSE_MAX_ENTRIES, len(weights) * 5 * width - 1  # the prefill fits, one entry over
    for limit in (small, large):
        monkeypatch.setattr(lora_batch, "DENSE_MAX_ENTRIES", limit)
        for name, x in (("prefill", prefill), ("decode", decode)):
            kernels = _Kernels()
            with torch.inference_mode(), GroupedLora(model).activate(plan), kernels:
                outputs[limit, name] = model(x)
            counts[limit, name] = kernels.ops
    assert counts[large, "prefill"]["bmm"] == 4 and counts[large, "prefill"]["index_select"] == 4  # 2 targets
    assert "bmm" not in counts[small, "prefill"] and counts[small, "prefill"]["mul_"] == 2
    assert counts[large, "decode"] == counts[small, "decode"]  # one token a row: dense whatever the limit
    torch.testing.assert_close(outputs[large, "prefill"], outputs[small, "prefill"])


def test_adapter_slots_are_allocated_up_front_and_a_failed_write_leaves_the_slot_empty():
    """Every target layer's stacks exist before any adapter arrives (the engine sizes its KV cache from the device
    memory left after them) and adapters are only copied in; a write that fails midway (here a corrupt tensor,
    on a GPU an out-of-memory copy) leaves the slot holding nothing, not what it held before with half of it zeroed."""
    model = _Tiny()
    slots = AdapterSlots(1, max_rank=8, targets=_targets(model), device=torch.device("cpu"), dtype=torch.float32)
    stacks = {name: (a.data_ptr(), bt.data_ptr()) for name, (a, bt) in slots._stacks.items()}
    assert set(stacks) == {"up", "down"}
    assert slots.nbytes == 2 * 8 * ((IN + HIDDEN) + (HIDDEN + OUT)) * 4  # (slots + 1) · rank · Σ(in + out) · fp32
    (kept, kept_raw), (broken, _) = _adapter(1, 4), _adapter(2, 4)
    assert slots.acquire(kept) == 1
    slots.release(1)
    broken.modules["down"] = (broken.modules["down"][0][:, :-1], broken.modules["down"][1])  # A [4, in - 1]
    with pytest.raises(RuntimeError):
        slots.acquire(broken)
    assert slots.resident_ids() == [] and slots.in_use == 0
    assert slots.acquire(kept) == 1 and slots.loads == 2  # written again, whole
    assert {name: (a.data_ptr(), bt.data_ptr()) for name, (a, bt) in slots._stacks.items()} == stacks
    x = torch.randn(2, 3, IN)
    lora = GroupedLora(model)
    with torch.inference_mode(), lora.activate(slots.plan(torch.tensor([1, 0]), [1, 0], [kept, None])):
        out = model(x)
    _check(out, _reference(model, x, [kept_raw, None]), torch.float32)
    unknown = LoraWeights(adapter_id="odd", modules={"elsewhere": kept.modules["up"]}, rank=4)
    slots.release(1)
    with pytest.raises(QwenVLError, match="'elsewhere' is not a layer adapters may target"):
        slots.acquire(unknown)


def test_plans_of_the_same_window_share_their_views_and_see_a_rewritten_slot():
    """A batch's plan is remade whenever a row joins or leaves; its views of the stacks are kept per window, rank
    and modules (made once, not per plan). Views, not copies: a slot written with another adapter since is seen."""
    model = _Tiny()
    slots = AdapterSlots(1, max_rank=8, targets=_targets(model), device=torch.device("cpu"), dtype=torch.float32)
    (first, first_raw), (second, second_raw) = _adapter(1, 4), _adapter(2, 4)
    x = torch.randn(2, 1, IN)
    lora = GroupedLora(model)
    plans = []
    for weights, raw in ((first, first_raw), (second, second_raw)):
        assert slots.acquire(weights) == 1
        plan = slots.plan(torch.tensor([1, 0]), [1, 0], [weights, None])
        plans.append(plan)
        with torch.inference_mode(), lora.activate(plan):
            _check(model(x), _reference(model, x, [raw, None]), torch.float32)
        slots.release(1)
    assert plans[0] is not plans[1] and plans[0].stacks is plans[1].stacks


def test_a_dense_plan_of_adapters_without_language_model_weights_is_empty():
    """Adapters of the vision tower only (rank 0, no language-model module) get slots like any other; a plan mixing
    them has nothing to apply, dense or not."""
    model = _Tiny()
    slots = AdapterSlots(2, max_rank=8, targets=_targets(model), device=torch.device("cpu"), dtype=torch.float32,
                         dense_decode=True)
    towers = [LoraWeights(adapter_id=f"tower{k}", modules={}, rank=0) for k in range(2)]
    picks = [slots.acquire(w) for w in towers]
    plan = slots.plan(torch.tensor(picks), picks, towers)
    assert plan is not None and plan.stacks == {} and plan.dense is None
    assert build_plan(towers, dense=True).dense is None
    x = torch.randn(2, 1, IN)
    with torch.inference_mode():
        expected = model(x)
        with GroupedLora(model).activate(plan):
            assert torch.equal(model(x), expected)


def test_row_layout_indices():
    """Slots [2, 0, 3, 2]: window 2..3, two positions per slot (slot 3 padded), base row 1 left out."""
    layout = row_layout([2, 0, 3, 2], "cpu")
    assert (layout.first, layout.groups) == (2, 2)
    assert layout.gather.tolist() == [0, 3, 2, 2]  # slot 2: rows 0, 3; slot 3: row 2, then padding
    assert layout.take.tolist() == [0, 2, 1]  # rows 0, 2, 3 in row order
    assert layout.rows.tolist() == [0, 2, 3]
    dense = row_layout([5, 5, 5], "cpu")  # every row on one adapter: the batch is the block, nothing gathered
    assert (dense.first, dense.groups, dense.gather, dense.take, dense.rows) == (5, 1, None, None, None)
    assert row_layout([0, 0], "cpu") is None and build_plan([None, None]) is None


def test_loaded_adapters_are_held_in_the_layout_of_the_device_slots(tiny_model_dir, adapter_dirs):
    """The host tier keeps each module's ``A [r, in]`` and ``(B·s)ᵀ [r, out]`` contiguous: a slot write is then a
    plain copy per tensor (asynchronous from pinned memory on a GPU), not a transpose staged through a temporary."""
    from qwenvl_core.models.registry import get_family
    from qwenvl_core.serving.lora_batch import load_lora_weights

    family = get_family("qwen-vl")
    model = family.load_model(tiny_model_dir)
    weights = load_lora_weights(adapter_dirs[9], "a9", model, family, device="cpu")
    linears = dict(model.named_modules())
    assert weights.modules and weights.rank == 4
    for name, (a, bt) in weights.modules.items():
        layer = linears[name]
        assert a.shape == (4, layer.in_features) and bt.shape == (4, layer.out_features), name
        assert a.is_contiguous() and bt.is_contiguous(), name


def test_sibling_targets_share_one_a_storage_and_each_adapter_lands_in_its_member():
    """Layers a forward calls on one input (``ModelFamily.lora_siblings``) get their A stacks as rows of one tensor
    (one matmul for the group in a fixed-shape decode step); a parent lacking a member, or whose members differ in
    input width, forms no group."""
    layers = {"l0.attn.q": nn.Linear(8, 8), "l0.attn.k": nn.Linear(8, 4), "l0.attn.v": nn.Linear(8, 4),
              "l1.attn.q": nn.Linear(8, 8), "l1.attn.k": nn.Linear(8, 4),  # no v: no group
              "l2.attn.q": nn.Linear(8, 8), "l2.attn.k": nn.Linear(6, 4), "l2.attn.v": nn.Linear(8, 4),
              "l0.mlp.up": nn.Linear(8, 16)}
    groups = sibling_groups(layers, [("attn.q", "attn.k", "attn.v")])
    assert groups == [("l0.attn.q", "l0.attn.k", "l0.attn.v")]
    slots = AdapterSlots(2, max_rank=4, targets=layers, device=torch.device("cpu"), dtype=torch.float32,
                         siblings=[("attn.q", "attn.k", "attn.v")])
    [(members, storage)] = slots.siblings()
    assert members == groups[0] and storage.shape == (3, 4, 3, 8)
    stacks = slots.stacks()
    torch.manual_seed(0)
    modules = {name: (torch.randn(2, 8), torch.randn(2, layers[name].out_features)) for name in members}
    slot = slots.acquire(LoraWeights(adapter_id="a", modules=modules, rank=2))
    for index, name in enumerate(members):
        assert stacks[name][0].data_ptr() == storage[index].data_ptr()
        assert torch.equal(storage[index, :2, slot], modules[name][0]) and not storage[index, 2:, slot].any()


class _Siblings(nn.Module):
    """q, k and v called on one input (sibling targets), then a layer on their product."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(IN, HIDDEN), nn.Linear(IN, HIDDEN), nn.Linear(IN, HIDDEN)
        self.o = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) * torch.tanh(self.k(x)) + self.v(x))


@pytest.mark.parametrize(("rows", "tokens"), [("mixed", 1), ("mixed", 5), ("one-adapter", 1), ("one-adapter", 5)],
                         ids=["mixed-decode", "mixed-prefill", "one-adapter-decode", "one-adapter-prefill"])
@pytest.mark.parametrize("rank", [8, 4], ids=["full-rank", "below"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_plans_share_one_product_per_sibling_group_at_any_rank(dtype, rank, rows, tokens):
    """The engine's plans (no graphs): q / k / v take their ``x · Aᵀ`` from one product for the group, whether the
    batch's largest rank is the slots' full rank or below it: a dense decode of several adapters (one batched
    matmul and one mask instead of three each) and one adapter on every row (one instead of three, prefill or
    decode). The same output as the model with each row's adapter merged. (A small prefill of several adapters takes
    the dense path too: ``DENSE_MAX_ENTRIES``.)"""
    torch.manual_seed(2)
    model = _Siblings().to(dtype)
    names = ("q", "k", "v", "o")
    slots = AdapterSlots(3, max_rank=8, targets=_targets(model), device=torch.device("cpu"), dtype=dtype,
                         dense_decode=True, siblings=[("q", "k", "v")])
    assert [members for members, _ in slots.siblings()] == []  # (top-level layers: no parent, no group)
    slots = AdapterSlots(3, max_rank=8, targets={f"m.{n}": layer for n, layer in _targets(model).items()},
                         device=torch.device("cpu"), dtype=dtype, dense_decode=True, siblings=[("q", "k", "v")])
    wrapped = nn.Module()
    wrapped.m = model
    adapters = []
    for seed, r in ((1, rank), (2, 2)):
        gen = torch.Generator().manual_seed(seed)
        modules = {f"m.{n}": (torch.randn(r, getattr(model, n).in_features, generator=gen).to(dtype),
                              (torch.randn(r, getattr(model, n).out_features, generator=gen) / r).to(dtype))
                   for n in names}
        adapters.append(LoraWeights(adapter_id=f"a{seed}", modules=modules, rank=r))
    first, second = slots.acquire(adapters[0]), slots.acquire(adapters[1])
    if rows == "mixed":
        row_slots, batch = [first, 0, second, first], [adapters[0], None, adapters[1], adapters[0]]
    else:
        row_slots, batch = [first] * 3, [adapters[0]] * 3
    plan = slots.plan(torch.tensor(row_slots), row_slots, batch)
    assert (plan.dense is not None) == (rows == "mixed")
    assert {name: (tuple(a.shape), index) for name, (a, index) in plan.siblings.items()} == {
        f"m.{n}": ((3, IN, rank * (4 if rows == "mixed" else 1)), i) for i, n in enumerate("qkv")}  # (4: slots + 1)
    x = torch.randn(len(batch), tokens, IN).to(dtype)
    lora, kernels = GroupedLora(wrapped), _Kernels()
    with torch.inference_mode():
        with lora.activate(plan), kernels:
            out = model(x)
        with lora.activate(slots.plan(torch.tensor(row_slots), row_slots, batch)):
            assert torch.equal(model(x), out)  # (a plan's group product is not kept into the next forward)
        for i, weights in enumerate(batch):  # (in float64, from the weights as the plan holds them)
            merged = _Siblings().double()
            merged.load_state_dict(model.state_dict())
            for n in names if weights is not None else ():
                a, bt = weights.modules[f"m.{n}"]
                getattr(merged, n).weight += (a.double().T @ bt.double()).T
            _check(out[i : i + 1], merged(x[i : i + 1].double()), dtype)
    masks = 2 if rows == "mixed" else 0  # the group's and o's
    assert kernels.ops["bmm"] == 1 and kernels.ops["mm"] == 1  # x·Aᵀ: the group's, and o's
    assert kernels.ops["mul_"] == masks and kernels.ops["addmm_"] == 4 and "clone" not in kernels.ops


@pytest.mark.parametrize("device", DEVICES)
def test_a_sibling_groups_product_is_one_matmul_of_the_rows_copying_nothing(device):
    """A sibling group's ``x · Aᵀ`` below the slots' full rank: one batched matmul of the rows expanded over the
    members (a stride-0 batch) by strided views of the A storage, with no copy of either first (on CUDA: no copy
    kernel among what ran; ``bench/gpu_check.sh`` runs the ``cuda`` case); each member's part is its own product."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    members = ("m.q", "m.k", "m.v")
    storage = torch.randn(len(members), 16, 5, IN, device=device)  # [members, max rank, slots, in]
    views = sibling_views([(members, storage)], members, 4)  # a dense plan at rank 4 of 16
    x = torch.randn(6, 1, IN, device=device)
    lora = GroupedLora(nn.Module())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        parts = [lora._sibling_product(views[name], x, x) for name in members]
        if device == "cuda":
            torch.cuda.synchronize()
    ops = [e.name for e in prof.events() if e.device_type == DeviceType.CPU]
    assert ops.count("aten::bmm") == 1 and "aten::copy_" not in ops and "aten::clone" not in ops, ops
    if device == "cuda":
        kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        assert kernels and not any("copy" in k.lower() for k in kernels), kernels
    for index, part in enumerate(parts):
        torch.testing.assert_close(part, x.reshape(-1, IN) @ storage[index, :4].flatten(0, 1).T)
