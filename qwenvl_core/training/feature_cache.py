"""Image features of a frozen vision tower, computed once per image and reused in later epochs and evaluations.

When nothing in the vision tower (encoder + vision-language adapter) trains, which is the case for LoRA on the
language model (the official recipe, 5 epochs) and for Q-LoRA, its output is a pure function of the pixels: every
epoch after the first would compute the same features again. ``ImageFeatureCache.install`` wraps the tower's
``forward`` so that images already seen (keyed by a hash of their pixel bytes) are taken from the cache and only
the others go through the tower, in one batch. Features are kept on the CPU (no accelerator memory is used) up to
a byte budget; the cache admits images until the budget is full and then stops admitting, so that cyclic epochs
over a dataset larger than the budget still hit on the admitted part (an LRU would evict every entry before its
reuse). A tower with trainable parameters is refused: its output changes every step and gradients must flow.

The cache keys on rows of the ``pixel_values`` of ``VisionInputs``, so it serves only a tower whose forward is
``forward(pixel_values)`` with one image per row, each image's features computed from its row alone (Qwen-VL
v1: ``[N, 3, S, S]`` -> ``[N, Q, D]``). A tower whose forward needs more than the pixels (transformers' Qwen2-VL,
Qwen2.5-VL and Qwen3-VL: ``forward(hidden_states, grid_thw)``, whose rows are the patches of all images) is
refused by ``install`` (``supports`` says so beforehand; the trainer then runs without the cache).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from torch import nn


class ImageFeatureCache:
    """Per-image outputs of a frozen vision tower, bounded by ``budget_bytes`` (see the module docstring)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._features: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def supports(tower: nn.Module) -> bool:
        """Whether ``tower``'s forward takes only the pixels (one image per row): the features it caches."""
        required = [p for p in inspect.signature(tower.forward).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        return len(required) == 1

    def install(self, tower: nn.Module) -> None:
        """Serve ``tower``'s forward from the cache from now on; ``ValueError`` if any parameter of it trains or
        its forward needs more than per-image pixel rows (see the module docstring)."""
        if not self.supports(tower):
            raise ValueError(f"the vision tower's forward{inspect.signature(tower.forward)} needs more than "
                             "one image per row of pixel_values: its features cannot be cached per image")
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the vision tower trains ({trainable[0]}, ...): its features cannot be cached")
        compute = tower.forward

        def cached_forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:
                return compute(pixel_values, *args, **kwargs)
            return self.features(pixel_values, compute)

        tower.forward = cached_forward  # instance attribute: nn.Module.__call__ (and its hooks) still run

    def features(self, pixel_values: torch.Tensor, compute: Any) -> torch.Tensor:
        """``compute(pixel_values)`` [N, Q, D], with the images seen before taken from the cache."""
        keys = [_key(image) for image in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self._features]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                computed = compute(pixel_values if len(missing) == len(keys) else pixel_values[missing])  # [M, Q, D]
            for row, i in enumerate(missing):
                fresh[i] = computed[row]
                self._admit(keys[i], computed[row])
        out = [fresh[i] if i in fresh else self._features[key].to(pixel_values.device, non_blocking=True)
               for i, key in enumerate(keys)]
        return torch.stack(out)

    def _admit(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self._features or self.used_bytes + size > self.budget_bytes:
            return
        self._features[key] = features.detach().to("cpu", copy=True)
        self.used_bytes += size

    def stats(self) -> dict[str, float]:
        """Hits, misses, hit rate and bytes held (for the run summary)."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "images": len(self._features), "bytes": self.used_bytes}


def _key(image: torch.Tensor) -> bytes:
    """A digest of one image's pixel tensor (its dtype, shape and bytes)."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy())  # any dtype as raw bytes, hashed in place (no copy)
    return digest.digest()
