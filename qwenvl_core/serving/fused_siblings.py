"""Sibling linear layers of the base model computed by one matmul in serving: the layers a forward calls on one
input, one after the other (``ModelFamily.lora_siblings``: v1's ``mlp.w1`` / ``mlp.w2``, the newer families'
``q_proj`` / ``k_proj`` / ``v_proj`` and ``gate_proj`` / ``up_proj``).

On a GPU a decode step is bound by its launches (docs/benchmarks.md, "First runs on an H200"), and each of these
layers is one GEMM launch of the same input. Here a group's weights (and biases) become row blocks of one tensor:
the first member called on an input computes ``x · [W₁; W₂; …]ᵀ + b`` for all, each member returns its columns of
that product (a view), and the group's last member drops the product again (nothing held between forwards). A
member called on another input (or out of order) computes the product anew: the values are always its own
layer's. The layers keep their class, name, ``weight`` (a view into the group's tensor) and hooks, so the LoRA hooks
(``lora_batch``) add their products into the member's columns in place.

Serving only (inference, no gradients); the language model's plain ``torch.nn.Linear`` layers only (a Q-LoRA
base's ``Linear4bit`` layers, and the vision tower, whose weights ``vision_adapters`` swaps per adapter, are left as
they are). Done on the loaded instances (``fuse_sibling_linears``), like ``models.hf_vl.fused_norms``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MethodType

import torch
import torch.nn.functional as F

from qwenvl_core.models.registry import ModelFamily
from qwenvl_core.serving.adapter_slots import sibling_groups
from qwenvl_core.serving.lora_batch import lora_targets

FUSED = "_qwenvl_fused_group"  # the attribute that marks a fused member (its group)


class _Group:
    """One group's fused weight and bias, and its members' columns of the product of the input it was last called
    on."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, widths: list[int]) -> None:
        self.weight, self.bias, self.widths = weight, bias, widths
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()

    def columns(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output on ``x``: its columns of the group's product (one ``split``: one op for the
        group's views, where a slice per member dispatches one each)."""
        if self.input is not x:  # the group's first member on this input
            self.input, self.parts = x, F.linear(x, self.weight, self.bias).split(self.widths, dim=-1)
        part = self.parts[index]
        if index == len(self.widths) - 1:  # hold nothing between forwards (a long prefill's product is large)
            self.input, self.parts = None, ()
        return part


def _member_forward(group: _Group, index: int) -> Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return group.columns(x, index)

    return forward


def _fusable(members: Sequence[torch.nn.Module]) -> bool:
    """Plain ``torch.nn.Linear`` layers (not a subclass such as bitsandbytes' ``Linear4bit``) of one dtype and
    device, all with a bias or none, not fused yet (a second engine over the same model finds them fused)."""
    return (all(type(m) is torch.nn.Linear and not hasattr(m, FUSED) for m in members)
            and len({(m.weight.dtype, m.weight.device, m.bias is None) for m in members}) == 1)


@torch.no_grad()
def fuse_sibling_linears(model: torch.nn.Module, family: ModelFamily) -> int:
    """Give each sibling group of the language model (``adapter_slots.sibling_groups`` of the layers an adapter may
    target: the parent holds all members, of one input width) one fused matmul where its members are
    ``_fusable``; returns how many groups this call fused. The members' weights become views of the group's weight
    (no extra memory once the old ones are freed). The vision tower is left as it is (``vision_adapters`` swaps its
    weights)."""
    targets = lora_targets(model, family)
    groups = [members for names in sibling_groups(targets, family.lora_siblings())
              if _fusable(members := [targets[name] for name in names])]
    for members in groups:
        weight = torch.cat([m.weight for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
        group = _Group(weight, bias, [m.out_features for m in members])
        start = 0
        for index, member in enumerate(members):
            end = start + member.out_features
            member.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
            if bias is not None:
                member.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
            member.forward = MethodType(_member_forward(group, index), member)
            setattr(member, FUSED, group)
            start = end
    if groups and groups[0][0].weight.is_cuda:
        # the members' old weights are free now, but held by the caching allocator: returned to the device, so that
        # the KV cache planned from free device memory next (``engine.kv_cache_budget``) can have them
        torch.cuda.empty_cache()
    return len(groups)
