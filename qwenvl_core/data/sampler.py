"""Deterministic, seedable samplers that resume at an exact position (for exact training resume).

An epoch's order is a pure function of ``(seed, epoch)``; the sampler's state is ``(epoch, position)``: how many
items of the current epoch have been handed out. ``state_dict()`` / ``load_state_dict()`` save and restore it,
and a restored sampler yields exactly the items the original would have yielded next, across epoch ends.

A ``DataLoader`` with workers pulls indices ahead of the training step; a trainer that resumes exactly should
save ``state_dict(consumed=n)`` with the number of items (or batches) of the current epoch it has actually
trained on, rather than the sampler's own read-ahead position.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from torch.utils.data import Sampler

from qwenvl_core.data.collate import length_grouped_batches
from qwenvl_core.data.issues import DataError

T = TypeVar("T")


class _Resumable(Sampler[T], ABC, Generic[T]):
    """Common epoch/position bookkeeping; subclasses define the order of one epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self.position = 0

    @abstractmethod
    def plan(self, epoch: int) -> list[T]:
        """The full, deterministic order of ``epoch``."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved state to be valid for this sampler."""

    def __iter__(self) -> Iterator[T]:
        items = self.plan(self.epoch)
        while self.position < len(items):
            self.position += 1
            yield items[self.position - 1]
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The resume state; ``consumed`` overrides the position (items of this epoch actually trained on)."""
        position = self.position if consumed is None else consumed
        return {**self.fingerprint(), "seed": self.seed, "epoch": self.epoch, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state saved for another dataset or seed is a ``DataError``."""
        expected = {**self.fingerprint(), "seed": self.seed}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise DataError(f"sampler state does not match this sampler ({details})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ResumableSampler(_Resumable[int]):
    """Indices ``0..n-1`` in a seeded random order per epoch (or in order with ``shuffle=False``)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(seed)
        self.n, self.shuffle = n, shuffle

    def __len__(self) -> int:
        return self.n

    def plan(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "samples", "n": self.n, "shuffle": self.shuffle}


class ResumableBatchSampler(_Resumable[list[int]]):
    """Batches of indices per epoch, length-grouped when lengths are given; position counts batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 drop_last: bool = False) -> None:
        super().__init__(seed)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.group_by_length, self.drop_last = group_by_length, drop_last

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def plan(self, epoch: int) -> list[list[int]]:
        seed = hash_seed(self.seed, epoch)
        if self.group_by_length:
            batches = length_grouped_batches(self.lengths, self.batch_size, seed)
        else:
            order = list(range(len(self.lengths)))
            random.Random(seed).shuffle(order)
            batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [b for b in batches if len(b) == self.batch_size] if self.drop_last else batches

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "batches", "n": len(self.lengths), "batch_size": self.batch_size,
                "group_by_length": self.group_by_length, "drop_last": self.drop_last}


def hash_seed(seed: int, epoch: int) -> int:
    """A per-epoch seed derived deterministically (independent of PYTHONHASHSEED)."""
    return random.Random(f"{seed}:{epoch}").getrandbits(63)
