"""v1's RMSNorm (``F.rms_norm``, fused on CUDA) against the official formula, written out: bit for bit on the CPU, in
the forward and in the gradients, for the dtypes the model runs in."""

import pytest
import torch

from qwenvl_core.models.qwen_vl.lm import RMSNorm


def official(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``modeling_qwen.RMSNorm`` without flash-attn: ``_norm(x.float()).type_as(x) * weight``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 64), (16, 1, 256), (1, 300, 96)])
def test_rms_norm_is_the_official_formula_bit_for_bit(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = (torch.randn(*shape) * 3).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight_ref = norm.weight.detach().clone().requires_grad_()

    out, expected = norm(x), official(x_ref, weight_ref, 1e-6)
    assert out.dtype == dtype
    assert torch.equal(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(norm.weight.grad, weight_ref.grad)
