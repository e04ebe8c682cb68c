"""Pickling messages whose tensors travel by value: a prepared request's pixel tensors, sent from a model replica to
its engine's process (``engine_process``).

Why not the usual pickling: ``multiprocessing``'s pickler hands a tensor over as shared memory behind a file
descriptor, which only a process that ``multiprocessing`` started can take; torch's own ``__reduce_ex__`` packs the
storage with ``torch.save`` and unpacks it with ``torch.load(weights_only=False)``. Here a CPU tensor becomes its
dtype, shape and raw bytes (pickle protocol 5, the bytes in one block) and comes back with ``torch.frombuffer``:
nothing but bytes is read into a tensor.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from typing import Any

import torch


def dumps(message: Any) -> bytes:
    """``message`` pickled, its CPU tensors by value (any ``pickle.loads`` reads it back)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
    pickler.dump(message)
    return buffer.getvalue()


def _reduce_tensor(tensor: torch.Tensor) -> tuple[Any, ...]:
    if tensor.device.type != "cpu":
        raise ValueError(f"only CPU tensors are sent by value, got one on {tensor.device}")
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    # a writable buffer pickles as a bytearray, which torch.frombuffer takes without a copy or a warning
    return tensor_from_bytes, (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), pickle.PickleBuffer(data))


def tensor_from_bytes(dtype: str, shape: tuple[int, ...], data: bytearray) -> torch.Tensor:
    """The tensor ``_reduce_tensor`` packed."""
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        raise ValueError(f"not a torch dtype: {dtype!r}")
    if not data:
        return torch.empty(shape, dtype=kind)
    return torch.frombuffer(data, dtype=torch.uint8).view(kind).reshape(shape)
