"""Batching: dynamic padding, length grouping, and packing equivalence on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenvl_core.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    EncodedSample,
    encode_sample,
    length_grouped_batches,
    naive_batches,
    pack_samples,
    padding_ratio,
)
from qwenvl_core.data.collate import concat_samples, pack_groups
from qwenvl_core.data.synth import generate_samples
from qwenvl_core.models.processing import VisionInputs
from qwenvl_core.models.qwen_vl import QWenLMHeadModel, build_config


def _row(ids: list[int], pixels: int = 0) -> EncodedSample:
    vision = VisionInputs({"pixel_values": torch.randn(pixels, 3, 4, 4)}, pixels) if pixels else None
    return EncodedSample(ids, list(ids), vision)


def test_collator_pads_to_the_longest_row_not_to_a_maximum():
    batch = Collator(pad_id=9)([_row([1, 2, 3], pixels=1), _row([4], pixels=2), _row([5, 6])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX], [5, 6, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and "segment_ids" not in batch
    assert Collator(pad_id=0, pad_to_multiple_of=8)([_row([1, 2, 3])])["input_ids"].shape == (1, 8)
    with pytest.raises(DataError):
        Collator(pad_id=0)([])


def test_length_grouping_reduces_padding_and_is_a_seeded_permutation():
    lengths = [((i * 7919) % 500) + 20 for i in range(1000)]
    grouped = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert grouped != length_grouped_batches(lengths, batch_size=8, seed=4)
    naive = naive_batches(1000, 8, seed=3)
    assert padding_ratio(lengths, grouped) < 0.1 < padding_ratio(lengths, naive)


def test_pack_groups_first_fit_decreasing():
    groups = pack_groups([5, 3, 4, 2, 6], max_length=8)
    assert sorted(groups) == [[0, 1], [2], [3, 4]]  # 6+2, 5+3, 4
    with pytest.raises(DataError, match="more than the packing length 8"):
        pack_groups([9], max_length=8)


def test_packed_row_segments_labels_and_pixels():
    a, b = _row([1, 2, 3], pixels=1), _row([4, 5], pixels=2)
    packed = concat_samples([a, b])
    assert packed.input_ids == [1, 2, 3, 4, 5] and packed.segment_ids == [1, 1, 1, 2, 2]
    assert packed.labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert packed.vision is not None and packed.vision.n_images == 3
    assert torch.equal(packed.vision.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))
    batch = Collator(pad_id=0)([packed, _row([7])])
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def tiny_model() -> QWenLMHeadModel:
    torch.manual_seed(0)
    return QWenLMHeadModel(build_config("qwen-vl-tiny")).eval()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, processor) -> list[EncodedSample]:
    image_dir = Path(tmp_path_factory.mktemp("synth")) / "images"
    samples = generate_samples(6, seed=1, image_dir=image_dir, image_size=112)
    return [encode_sample(s, processor) for s in samples]


def _summed_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean loss times the number of trained targets = the summed token loss."""
    with torch.no_grad():
        out = model(**batch)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.loss * n, n


def test_packed_loss_equals_sum_of_unpacked_losses(tiny_model, encoded, processor):
    collate = Collator(pad_id=processor.tokenizer.eod_id)
    singles = [_summed_loss(tiny_model, collate([s])) for s in encoded]
    rows = pack_samples(encoded, max_length=2 * max(len(s) for s in encoded))
    assert len(rows) < len(encoded)  # some rows really hold several samples
    packed = _summed_loss(tiny_model, collate(rows))
    assert packed[1] == sum(n for _, n in singles)
    torch.testing.assert_close(packed[0], sum(loss for loss, _ in singles), rtol=1e-5, atol=1e-4)


def test_padded_batch_loss_equals_sum_of_single_losses(tiny_model, encoded, processor):
    collate = Collator(pad_id=processor.tokenizer.eod_id)
    singles = [_summed_loss(tiny_model, collate([s])) for s in encoded]
    batch = _summed_loss(tiny_model, collate(encoded))
    torch.testing.assert_close(batch[0], sum(loss for loss, _ in singles), rtol=1e-5, atol=1e-4)


def test_packed_logits_equal_unpacked_logits(tiny_model, encoded, processor):
    collate = Collator(pad_id=processor.tokenizer.eod_id)
    first, second = encoded[0], encoded[5]
    with torch.no_grad():
        packed = tiny_model(**collate([concat_samples([first, second])])).logits[0]
        alone = tiny_model(**collate([second])).logits[0]
    torch.testing.assert_close(packed[len(first):], alone, rtol=1e-4, atol=1e-4)
