"""How random model directories build their modules: ``default_dtype`` (parameters in a given floating-point dtype)
and ``seeded_init`` (drawn from a seed, on a given device, without disturbing the caller's random state)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside the block default to ``dtype``; the previous default is restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def seeded_init(seed: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> Iterator[None]:
    """Modules built inside the block draw their weights from ``seed`` on ``device`` in ``dtype``; the random state
    of the CPU (and of ``device``) is restored after it. A GPU draws a full-size model in seconds where the CPU's
    single random stream takes minutes; the same seed gives the same weights on the same kind of device."""
    device = torch.device(device)
    forked = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=forked, device_type="cuda" if device.type == "cpu" else device.type), \
            default_dtype(dtype), device:
        torch.manual_seed(seed)
        yield
