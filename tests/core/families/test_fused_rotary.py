"""The transformers families' rotary embedding in fewer kernels (``hf_vl.fused_rotary``) computes what transformers'
``apply_rotary_pos_emb`` does, bit for bit: on q and k apart and on q and k as adjacent heads of one matmul's output
(the serving engine's fused q / k / v), values and gradients; and whole models' logits and gradients with either."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwenvl_core.models.hf_vl import fused_rotary
from qwenvl_core.models.registry import get_family
from tests.core.families.conftest import HF_FAMILIES
from tests.core.families.model_runs import image_prompt, logits_and_grads
from tests.devices import DEVICES

MODULE = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
B, T, HQ, HK, D = 3, 5, 4, 2, 16


def _transformers_rotary():
    assert fused_rotary.install_fused_rotary(MODULE)
    return fused_rotary.ORIGINALS[MODULE]


def _cos_sin(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """As the families' rotary modules give them: [B, T, D], the frequencies repeated over both halves."""
    positions = torch.arange(T, dtype=torch.float32)[None, :, None] + torch.arange(B)[:, None, None] * 7
    freqs = positions * (1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(dtype: torch.dtype, adjacent: bool, grad: bool = False, tokens: int = T,
        device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """q [B, HQ, tokens, D] and k [B, HK, tokens, D] as the attention makes them: views of one q / k / v matmul
    output (``adjacent``) or of two."""
    gen = torch.Generator().manual_seed(0)
    if adjacent:
        fused = torch.randn(B, tokens, (HQ + 2 * HK) * D, generator=gen).to(device, dtype).requires_grad_(grad)
        q_cols, k_cols = fused[..., : HQ * D], fused[..., HQ * D : (HQ + HK) * D]
        leaves = (fused,)
    else:
        q_cols = torch.randn(B, tokens, HQ * D, generator=gen).to(device, dtype).requires_grad_(grad)
        k_cols = torch.randn(B, tokens, HK * D, generator=gen).to(device, dtype).requires_grad_(grad)
        leaves = (q_cols, k_cols)
    q = q_cols.view(B, tokens, HQ, D).transpose(1, 2)
    k = k_cols.view(B, tokens, HK, D).transpose(1, 2)
    return q, k, leaves


class _Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [T, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("adjacent", [True, False], ids=["adjacent-heads", "apart"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_rotary_equals_transformers_bit_for_bit_in_fewer_kernels(device, dtype, adjacent, tokens):
    """(A decode step's one token: views give that dim a stride of their own, q's and k's apart.)"""
    theirs = _transformers_rotary()
    cos, sin = (c[:, :tokens].to(device) for c in _cos_sin(dtype))
    q, k, _ = _qk(dtype, adjacent, tokens=tokens, device=device)
    expected = theirs(q, k, cos, sin)
    kernels = _Kernels()
    with kernels:
        got = fused_rotary.apply_rotary_pos_emb(q, k, cos, sin)
        again = fused_rotary.apply_rotary_pos_emb(q, k, cos, sin)  # a later layer of the same forward
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert all(torch.equal(g, e) for g, e in zip(again, expected, strict=True))
    per_layer = 4 if adjacent else 8  # mul, roll, mul, add: once for both, or for each (transformers: 10)
    assert kernels.ops["mul"] + kernels.ops["roll"] + kernels.ops["add"] == 2 * per_layer, kernels.ops
    assert kernels.ops["neg"] == 1 and kernels.ops["cat"] == 1  # the sign folded into sin, once for both layers
    # the other layout transformers allows: cos / sin unsqueezed at 2 for q / k as [B, T, H, D]
    q2, k2 = q.transpose(1, 2), k.transpose(1, 2)
    theirs2, got2 = theirs(q2, k2, cos, sin, unsqueeze_dim=2), fused_rotary.apply_rotary_pos_emb(q2, k2, cos, sin, 2)
    assert all(torch.equal(g, e) for g, e in zip(got2, theirs2, strict=True))


@pytest.mark.parametrize("adjacent", [True, False], ids=["adjacent-heads", "apart"])
def test_the_rotarys_gradients_equal_transformers_bit_for_bit(adjacent):
    """With gradients wanted, adjacent q and k are rotated apart (one view of both, made from q, would leave k's
    gradient out: tried, k's columns got 0)."""
    theirs = _transformers_rotary()
    cos, sin = _cos_sin(torch.float32)
    grads = []
    for rotary in (theirs, fused_rotary.apply_rotary_pos_emb):
        q, k, leaves = _qk(torch.float32, adjacent, grad=True)
        q_out, k_out = rotary(q, k, cos, sin)
        (q_out.pow(2).sum() + (k_out * torch.linspace(-1, 1, D)).sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert all(g.abs().sum() > 0 for g in grads[1])


def _watched(name: str) -> bool:
    return ".layers.0." in name or ".layers.1." in name


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_loaded_model_computes_the_same_logits_and_gradients_with_either_rotary(tiny_dirs, name, monkeypatch):
    import importlib

    family = get_family(name)
    model = family.load_model(tiny_dirs[name], dtype=torch.bfloat16)  # installs the fused rotary
    module = importlib.import_module(type(model).__module__)
    assert module.apply_rotary_pos_emb is fused_rotary.apply_rotary_pos_emb
    model.requires_grad_(True)
    inputs = image_prompt(family.load_processor(tiny_dirs[name]).hf, torch.bfloat16)
    fused = logits_and_grads(model, inputs, _watched)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", fused_rotary.ORIGINALS[module.__name__])
    own = logits_and_grads(model, inputs, _watched)
    assert fused.keys() == own.keys() and len(fused) > 4
    assert all(torch.equal(fused[k], own[k]) for k in fused), [k for k in fused if not torch.equal(fused[k], own[k])]


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_served_models_fused_q_and_k_are_rotated_as_one(tiny_dirs, name):
    """The serving engine's q / k / v as one matmul (``fused_siblings``, a GPU's default) leave q and k adjacent heads
    of one output: one rotation a layer. Qwen3-VL normalises q and k per head first (new tensors): two."""
    from qwenvl_core.serving.fused_siblings import fuse_sibling_linears

    family = get_family(name)
    model = family.load_model(tiny_dirs[name])
    fuse_sibling_linears(model, family)
    layers = model.config.get_text_config().num_hidden_layers
    kernels = _Kernels()
    with torch.inference_mode(), kernels:
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert kernels.ops["roll"] == layers * (2 if name == "qwen3-vl" else 1), kernels.ops
