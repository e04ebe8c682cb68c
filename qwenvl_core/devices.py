"""Which device a component computes on: ``checked_device`` turns a configured name into a ``torch.device`` (a clear
error naming the setting for a malformed name, or a GPU (or GPU index) this process cannot see), ``default_device`` is what a
component uses when nothing is configured (this process's GPU when one is visible, else the CPU), ``model_device``
is where a model's weights are (what its inputs must follow); ``host_to_device`` / ``queued_copy`` move a small host
list or tensor to the device without making the host wait for the device's queued work."""

from __future__ import annotations

import os
from typing import Any

import torch

from qwenvl_core.errors import QwenVLError


def checked_device(name: str | torch.device, setting: str) -> torch.device:
    """``name`` (the value of ``setting``) as a torch device; ``QwenVLError`` naming ``setting`` when it is not a
    device name or names a GPU while none is visible."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise QwenVLError(f"{setting} {name!r}: not a device name (expected 'cpu', 'cuda' or 'cuda:N')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QwenVLError(f"{setting} {name!r}: no CUDA device is visible to this process")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise QwenVLError(f"{setting} {name!r}: this process sees {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return device


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (a launcher's per-process GPU; 0 without one) when CUDA is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter; the CPU for a callable that is no module or has none."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def host_to_device(values: Any, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (a small host list) as a ``dtype`` tensor on ``device``, copied by ``queued_copy``."""
    return queued_copy(torch.tensor(values, dtype=dtype), device)


def queued_copy(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``. A plain ``.to("cuda")`` (or ``torch.tensor(..., device="cuda")``)
    copies and then synchronises the stream, so the host waits for every kernel queued before it (a forward pass).
    Here the tensor goes through page-locked memory and the copy is queued behind those kernels (from pageable
    memory CUDA may still synchronise to stage it); PyTorch's pinned-memory cache keeps the host block until the
    copy is done."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
