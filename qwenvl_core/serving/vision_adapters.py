"""Adapters that change the vision tower, served per image with the adapter of the image's row.

Training writes two kinds of vision weights into a PEFT adapter: LoRA on the vision encoder's ``Linear`` layers
(``lora.vision_lora``) and full weights of tower modules (``lora.train_adapter``: the merger, Qwen3-VL's DeepStack
mergers, v1's Resampler and ``ln_post``; saved as peft ``modules_to_save``). This module owns

- ``VisionWeights``: that part of one adapter, names relative to the tower: ``A`` and ``(B·scaling)ᵀ`` per encoder
  ``Linear``, and replacement tensors per tower parameter. ``take_vision_weights`` moves them out of an adapter's
  tensors when ``lora_batch.load_lora_weights`` reads it (the rest is the language model's LoRA) and checks them
  against the base: a tensor that does not fit is an ``AdapterError`` naming the adapter and the key;
- ``VisionAdapters``: the tower of one served model. Inside ``encoding(images)`` (each image of a prefill with
  its adapter's ``VisionWeights``, or None: the base tower), the model's one call of its tower runs as one pass
  per *run* of consecutive images sharing weights. A pass with weights adds the LoRA deltas ``x·Aᵀ·(B·s)ᵀ``
  through forward hooks on the encoder's linears and takes the replacement tensors through
  ``torch.func.functional_call`` (the base parameters are put back after the pass and never written). The tower's
  inputs and outputs run over the images along dim 0, in order (the ``VisionInputs`` contract), so the passes'
  inputs are slices of the call's and their outputs, joined, are what the model splices into its image spans.
  ``tower_order`` sorts a prefill's rows so that each adapter's images form one run (base images share one pass).
  A batch without vision weights never enters this path: one base pass, as before.

Weights live on the host with the adapter (``AdapterCache``); a pass on a GPU uses a device copy
(``DeviceCopies``), kept for the adapters used last while their copies fit ``max_device_bytes`` (the engine reserves
that much before it sizes its KV cache from free memory; the newest copy is kept even when it alone is larger).
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.processing import VisionInputs
from qwenvl_core.models.registry import ModelFamily
from qwenvl_core.serving.lora_batch import LORA_KEY, AdapterError, lora_pair

_PEFT_PREFIX = "base_model.model."
Row = TypeVar("Row")


@dataclass
class VisionWeights:
    """One adapter's vision-tower weights (names relative to the tower, as ``tower.named_modules()`` gives them)."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder Linear -> (A [r, in], (B·scaling)ᵀ [r, out])
    tensors: dict[str, torch.Tensor]  # tower parameter -> its replacement (same shape and dtype)

    @property
    def nbytes(self) -> int:
        every = [t for pair in self.lora.values() for t in pair] + list(self.tensors.values())
        return sum(t.numel() * t.element_size() for t in every)

    def to(self, device: torch.device) -> VisionWeights:
        return VisionWeights({n: (a.to(device, non_blocking=True), bt.to(device, non_blocking=True))
                              for n, (a, bt) in self.lora.items()},
                             {n: t.to(device, non_blocking=True) for n, t in self.tensors.items()})


class DeviceCopies:
    """Device copies of host ``VisionWeights``, least recently used dropped once their bytes pass ``max_bytes``
    (the newest always kept). Keyed by the host weights' identity: weights the ``AdapterCache`` evicted and another
    object reused the id of never return a stale copy."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._copies: OrderedDict[int, tuple[weakref.ref[VisionWeights], VisionWeights, int]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._copies.values())

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, weights: VisionWeights, device: torch.device) -> VisionWeights:
        """``weights`` on ``device``: themselves when already there, else a kept or a new copy."""
        sample = next(iter(weights.tensors.values()), None)
        if sample is None:
            sample = next(iter(weights.lora.values()))[0]
        if sample.device == device:
            return weights
        entry = self._copies.get(id(weights))
        if entry is not None and entry[0]() is weights:
            self._copies.move_to_end(id(weights))
            return entry[1]
        for key in [key for key, (ref, _, _) in self._copies.items() if ref() is None]:
            del self._copies[key]  # the host weights are gone (evicted adapters): their copies can never be used
        copy = weights.to(device)
        self._copies[id(weights)] = (weakref.ref(weights), copy, copy.nbytes)
        self._copies.move_to_end(id(weights))
        total = self.nbytes
        while total > self.max_bytes and len(self._copies) > 1:
            total -= self._copies.popitem(last=False)[1][2]
        return copy

    def clear(self) -> None:
        self._copies.clear()


def tower_prefix(model: nn.Module, family: ModelFamily) -> tuple[nn.Module, str]:
    """The vision tower of ``model`` and its module name with a trailing dot (``model.visual.``)."""
    tower = family.vision_tower(model)
    name = next(n for n, m in model.named_modules() if m is tower)
    return tower, name + "."


def take_vision_weights(
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    path: Path,
    adapter_id: str,
    model: nn.Module,
    family: ModelFamily,
    *,
    max_rank: int,
    device: torch.device,
    pin: bool,
) -> VisionWeights | None:
    """Remove the vision tower's tensors from ``tensors`` (an adapter's, PEFT keys) and return them checked, on
    ``device`` (pinned when ``pin``); None when the adapter has none. Full weights outside the tower (peft
    ``modules_to_save`` of the language model) are refused: rows of one batch share the language model's modules."""
    tower, prefix = tower_prefix(model, family)
    where = f"adapter {adapter_id} ({path})"
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    state = tower.state_dict(keep_vars=True)
    for key in list(tensors):
        match = LORA_KEY.fullmatch(key)
        name = (match["module"] if match else key).removeprefix(_PEFT_PREFIX)
        if not name.startswith(prefix):
            if match is None:
                raise AdapterError(f"{where}: {key!r} holds full weights of a module outside the vision tower "
                                   f"({prefix[:-1]}); the serving engine applies modules_to_save of the vision "
                                   "tower only")
            continue  # the language model's LoRA: lora_batch's
        tensor = tensors.pop(key)
        local = name[len(prefix):]
        if match is not None:
            lora.setdefault(local, {})[match["ab"]] = tensor
            continue
        base = state.get(local)
        if base is None:
            raise AdapterError(f"{where}: {key!r} is not a parameter of the base model's vision tower")
        if tuple(tensor.shape) != tuple(base.shape):
            raise AdapterError(f"{where}: {key!r} has shape {tuple(tensor.shape)}; the base model's {name} has "
                               f"{tuple(base.shape)}")
        value = tensor.to(device, base.dtype).contiguous()
        replaced[local] = value.pin_memory() if pin else value
    modules = dict(tower.named_modules())
    pairs = {}
    for local, pair in lora.items():
        full = prefix + local
        layer = modules.get(local)
        if layer is None or not isinstance(layer, nn.Linear) or family.component_of(full + ".weight") != "vision":
            raise AdapterError(f"{where}: LoRA target {full!r} is not a Linear layer of the vision encoder (the "
                               "merger is trained as full weights: lora.train_adapter)")
        pairs[local] = lora_pair(full, pair, layer, config, path, max_rank=max_rank, dtype=layer.weight.dtype,
                                 device=device, pin=pin)
    return VisionWeights(pairs, replaced) if pairs or replaced else None


def tower_order(rows: Sequence[Row], vision_of: Callable[[Row], VisionWeights | None]) -> list[Row]:
    """``rows`` sorted (stably) so that the images of each adapter's rows are consecutive: rows using the base
    tower first, then by adapter in order of first appearance. ``rows`` as they are when none has vision weights."""
    rank: dict[int, int] = {}
    for row in rows:
        weights = vision_of(row)
        if weights is not None:
            rank.setdefault(id(weights), len(rank) + 1)
    if not rank:
        return list(rows)
    return sorted(rows, key=lambda row: rank.get(id(vision_of(row)), 0))


@dataclass
class _Run:
    """Consecutive images sharing tower weights: the weights (on the device) and the rows of each input tensor."""

    weights: VisionWeights | None
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class VisionStats:
    passes: int = 0  # tower passes with an adapter's weights
    max_runs: int = 0  # most passes one tower call was split into


class VisionAdapters:
    """Per-image vision weights for one served model (module docstring); used by the engine's model thread only."""

    def __init__(self, model: nn.Module, family: ModelFamily, max_device_bytes: int = 1 << 30) -> None:
        self._model, self._family = model, family
        self._tower: nn.Module | None = None
        self._original: Callable[..., Any] | None = None
        self._declared: frozenset[str] = frozenset()  # the named parameters of the tower's forward
        self._runs: list[_Run] | None = None
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.copies = DeviceCopies(max_device_bytes)
        self.stats = VisionStats()

    @contextmanager
    def encoding(self, images: Iterable[tuple[VisionWeights | None, VisionInputs]]) -> Iterator[None]:
        """Encode the images of forwards inside the block each with its weights (``images`` in prompt order)."""
        runs: list[_Run] = []
        for weights, inputs in images:
            if not runs or runs[-1].weights is not weights:
                runs.append(_Run(weights))
            for key, tensor in inputs.tensors.items():
                runs[-1].rows[key] = runs[-1].rows.get(key, 0) + tensor.shape[0]
        if all(run.weights is None for run in runs):
            yield  # the base tower for every image: the model's own call, untouched
            return
        tower = self._install()
        device = next(tower.parameters()).device
        for run in runs:
            run.weights = None if run.weights is None else self.copies.get(run.weights, device)
        self._runs = runs
        try:
            yield
        finally:
            self._runs = None

    def close(self) -> None:
        """Remove the hooks and give the tower its own forward back."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        if self._tower is not None:
            del self._tower.forward  # the instance attribute: the class's forward again
            self._tower = self._original = None
        self.copies.clear()

    # ----- inside the model's forward ----------------------------------------------------------------------------
    def _install(self) -> nn.Module:
        if self._tower is None:
            tower = self._family.vision_tower(self._model)
            self._original = tower.forward
            self._declared = frozenset(name for name, p in inspect.signature(tower.forward).parameters.items()
                                       if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
            tower.forward = self._forward  # instance attribute: nn.Module.__call__ (and its hooks) still run
            self._tower = tower
        return self._tower

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        runs, self._runs = self._runs, None  # the passes below call the tower again: straight through then
        assert self._original is not None
        if runs is None:
            return self._original(*args, **kwargs)
        try:
            pieces = _split(args, kwargs, self._declared, runs)
            self.stats.max_runs = max(self.stats.max_runs, len(runs))
            return _join([self._pass(run.weights, a, k) for run, (a, k) in zip(runs, pieces, strict=True)])
        finally:
            self._runs = runs

    def _pass(self, weights: VisionWeights | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self._tower is not None and self._original is not None
        if weights is None:
            return self._original(*args, **kwargs)
        self.stats.passes += 1
        for name in weights.lora.keys() - self._hooks.keys():
            self._hooks[name] = self._tower.get_submodule(name).register_forward_hook(self._lora_hook(name))
        self._lora = weights.lora
        try:
            if weights.tensors:
                return torch.func.functional_call(self._tower, weights.tensors, args, kwargs, strict=False)
            return self._original(*args, **kwargs)
        finally:
            self._lora = None

    def _lora_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            lora = self._lora
            if lora is None or name not in lora:
                return None
            a, bt = lora[name]
            return output + ((args[0].to(a.dtype) @ a.T) @ bt).to(output.dtype)

        return hook


def _split(args: tuple[Any, ...], kwargs: dict[str, Any], declared: frozenset[str],
           runs: Sequence[_Run]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each run's slice of the tower call's arguments: a tensor the tower's forward declares (positional, or named in
    ``declared``) is cut along dim 0 by the rows of the vision input with as many rows in all (``pixel_values``
    patches, ``image_grid_thw`` images); anything else (keywords passed through ``**kwargs``) is shared."""
    totals = {key: sum(run.rows.get(key, 0) for run in runs) for key in runs[0].rows}

    def cut(name: str, value: Any) -> list[Any]:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or not (name[0] == "#" or name in declared):
            return [value] * len(runs)
        splits = {tuple(run.rows.get(key, 0) for run in runs) for key, n in totals.items() if n == value.shape[0]}
        if len(splits) != 1:
            raise QwenVLError(f"the vision tower's argument {name} has {value.shape[0]} rows; the batch's images "
                              f"have {totals}: it cannot be cut per adapter")
        return list(value.split(list(splits.pop())))

    positional = [cut(f"#{i}", a) for i, a in enumerate(args)]
    named = {k: cut(k, v) for k, v in kwargs.items()}
    return [(tuple(p[i] for p in positional), {k: v[i] for k, v in named.items()}) for i in range(len(runs))]


def _join(parts: Sequence[Any]) -> Any:
    """The outputs of consecutive passes as one call's: tensors concatenated along dim 0, containers (model
    outputs, lists of per-layer features) joined field by field."""
    first = parts[0]
    if first is None or len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return type(first)(**{key: _join([part[key] for part in parts]) for key in first})
    if isinstance(first, list | tuple):
        return type(first)(_join(list(items)) for items in zip(*parts, strict=True))
    raise QwenVLError(f"cannot join vision tower outputs of type {type(first).__name__}")

