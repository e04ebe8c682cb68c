"""What the device tests share: ``DEVICES`` (``cpu`` always, ``cuda`` marked ``gpu`` and skipped without a GPU;
``bench/gpu_check.sh`` runs those where one is lent) and ``DeviceRecorder``, which records every op that computes
off the configured device from tensors on it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEVICES = [pytest.param("cpu", id="cpu"),
           # skipped on machines without a GPU (CI's); bench/gpu_check.sh runs it where one is lent
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device")])]


class DeviceRecorder(TorchDispatchMode):
    """While active (in this thread), records every op that reads a tensor on ``device`` and writes one
    elsewhere: compute that left the device, or a device-to-host read (``_to_copy`` / ``to`` / ``_local_scalar_dense``).
    The 0-dim tensors a fused attention kernel returns on the host beside its outputs on the device (the RNG seed and
    offset of ``_scaled_dot_product_efficient_attention`` on CUDA) are its bookkeeping, not compute that left."""

    # ``aten.to.`` with its dot (not ``aten.topk``): on CUDA, torch 2.11 dispatches ``Tensor.cpu()`` as ``to``
    READS = ("aten._to_copy", "aten.to.", "aten._local_scalar_dense", "aten.copy_", "aten.item", "aten.is_nonzero")

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device).type
        self.left: list[str] = []  # ops computing off the device from device inputs
        self.reads: list[str] = []  # device-to-host reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]  # lists too (foreach)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outputs and (func._schema.is_mutable or func.namespace == "c10d"
                            or (isinstance(out, tuple | list) and len(out) == 0)):
            return out  # in place (the optimizer's _foreach_mul_), a collective, or an empty tensor list (unbind
            # of ZeRO-3's empty partitions): it wrote only its own inputs, or nothing
        if outputs and all(t.device.type == "meta" for t in outputs):
            return out  # shape placeholders (DeepSpeed's): no data, no compute
        from_device = any(t.device.type == self.device for t in inputs)
        on_device = any(t.device.type == self.device for t in outputs)
        off_device = [t for t in outputs if t.device.type != self.device and not (on_device and t.dim() == 0)]
        if from_device and (not outputs or off_device):
            (self.reads if str(func).startswith(self.READS) else self.left).append(str(func))
        return out
