"""Batching of encoded samples: dynamic padding, length-grouped batches and sequence packing.

- ``Collator`` right-pads a batch to its own longest row (optionally rounded up to a multiple), never to the
  maximum length: ``input_ids`` with the pad id (``<|endoftext|>``), ``labels`` with -100, ``attention_mask``
  0 on padding, and the tensors of all rows' ``VisionInputs`` under their names (v1: ``pixel_values``), the
  images in order of appearance (row by row, left to right), as the model's forward contract requires; every
  tensor on the collator's ``device`` (the model's).
- ``length_grouped_batches`` shuffles, then sorts by length inside mega-batches, so rows of a batch have
  similar lengths and little padding, while the order stays random and seed-determined.
- ``pack_samples`` concatenates whole samples into rows of at most ``max_length`` tokens with ``segment_ids``
  (1, 2, ... per sample; 0 on padding). The model lets a token attend only to earlier tokens of its own
  segment and restarts positions per segment, and the first label of every segment is set to -100 so the last
  token of one sample is never trained to predict the first token of the next: the summed loss of a packed
  row equals the sum of the summed losses of its samples run one by one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenvl_core.data.encode import IGNORE_INDEX, EncodedSample
from qwenvl_core.data.issues import DataError
from qwenvl_core.models.processing import VisionInputs


@dataclass
class PackedSample:
    """Several encoded samples in one row; ``segment_ids`` numbers them from 1."""

    input_ids: list[int]
    labels: list[int]
    segment_ids: list[int]
    vision: VisionInputs | None  # the samples' images in order of appearance; None without images

    def __len__(self) -> int:
        return len(self.input_ids)


Row = EncodedSample | PackedSample


@dataclass(frozen=True)
class Collator:
    """Turns a list of encoded (or packed) samples into model inputs with dynamic right padding."""

    pad_id: int
    pad_to_multiple_of: int = 1
    device: torch.device | str = "cpu"  # where the batch goes: the device of the model it is fed to

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        if not rows:
            raise DataError("cannot collate an empty batch")
        width = max(len(r.input_ids) for r in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([r.input_ids for r in rows], width, self.pad_id),  # [B, T]
            "labels": _pad([r.labels for r in rows], width, IGNORE_INDEX),  # [B, T]
            "attention_mask": _pad([[1] * len(r.input_ids) for r in rows], width, 0),  # [B, T]
        }
        if any(isinstance(r, PackedSample) for r in rows):
            segments = [r.segment_ids if isinstance(r, PackedSample) else [1] * len(r) for r in rows]
            batch["segment_ids"] = _pad(segments, width, 0)  # [B, T]
        vision = VisionInputs.concat(r.vision for r in rows)
        if vision is not None:
            batch |= vision.as_kwargs()  # v1: pixel_values [N_images, 3, S, S]
        if torch.device(self.device).type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def padding_ratio(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of padded positions when each batch (indices into ``lengths``) is padded to its longest row."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / total if total else 0.0


def naive_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches without regard to length (the baseline for ``padding_ratio``)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega_batch: int = 50
                           ) -> list[list[int]]:
    """Batches of indices with similar lengths, in a seed-determined random order.

    The indices are shuffled, cut into mega-batches of ``mega_batch * batch_size``, sorted by length (longest
    first) inside each, cut into batches, and the batches are shuffled again.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = max(1, mega_batch * batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start: start + size], key=lambda i: -lengths[i])
        batches.extend(mega[i: i + batch_size] for i in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    return batches


def pack_groups(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing assignment of samples to rows of at most ``max_length`` tokens (indices)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_length:
            raise DataError(f"sample {i} has {lengths[i]} tokens, more than the packing length {max_length}")
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(r) for r in rows]


def pack_samples(samples: Sequence[EncodedSample], max_length: int) -> list[PackedSample]:
    """Pack ``samples`` into rows of at most ``max_length`` tokens (see the module docstring)."""
    groups = pack_groups([len(s.input_ids) for s in samples], max_length)
    return [concat_samples([samples[i] for i in group]) for group in groups]


def concat_samples(samples: Sequence[EncodedSample]) -> PackedSample:
    """One packed row from ``samples`` in the given order."""
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    for seg, sample in enumerate(samples, 1):
        ids.extend(sample.input_ids)
        labels.append(IGNORE_INDEX)  # never predict a sample's first token from the previous sample
        labels.extend(sample.labels[1:])
        segments.extend([seg] * len(sample.input_ids))
    return PackedSample(ids, labels, segments, VisionInputs.concat(s.vision for s in samples))
