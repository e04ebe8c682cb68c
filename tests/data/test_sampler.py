"""Samplers: deterministic per seed and epoch, resumable at an exact position across epoch ends."""

from __future__ import annotations

import itertools

import pytest

from qwenvl_core.data import DataError, ResumableBatchSampler, ResumableSampler


def _take(sampler, n: int) -> list:
    """The next n items, continuing into later epochs like a training loop does."""
    out: list = []
    while len(out) < n:
        out.extend(itertools.islice(iter(sampler), n - len(out)))
    return out


def _fresh_samplers():
    return [lambda: ResumableSampler(23, seed=5), lambda: ResumableSampler(23, seed=5, shuffle=False),
            lambda: ResumableBatchSampler([(i * 37) % 50 + 1 for i in range(23)], batch_size=4, seed=5),
            lambda: ResumableBatchSampler(list(range(23)), 4, seed=5, group_by_length=False, drop_last=True)]


@pytest.mark.parametrize("make", _fresh_samplers())
@pytest.mark.parametrize("stop", [0, 1, 3, 5, 6, 13])
def test_resume_continues_exactly(make, stop):
    reference = _take(make(), 20)
    interrupted = make()
    _take(interrupted, stop)
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert reference[:stop] + _take(resumed, 20 - stop) == reference


def test_epochs_differ_and_cover_every_index():
    sampler = ResumableSampler(10, seed=1)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert list(ResumableSampler(10, seed=1)) == first and list(ResumableSampler(10, seed=2)) != first


def test_state_with_consumed_count_and_mismatch():
    sampler = ResumableSampler(10, seed=1)
    order = list(ResumableSampler(10, seed=1))
    it = iter(sampler)
    [next(it) for _ in range(7)]  # read ahead (a DataLoader prefetches) ...
    state = sampler.state_dict(consumed=4)  # ... but only 4 were trained on
    resumed = ResumableSampler(10, seed=1)
    resumed.load_state_dict(state)
    assert list(resumed) == order[4:]
    with pytest.raises(DataError, match="n: saved 10, now 11"):
        ResumableSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        ResumableSampler(10, seed=2).load_state_dict(state)


def test_batch_sampler_lengths_and_drop_last():
    sampler = ResumableBatchSampler([5] * 10, batch_size=4, drop_last=True)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert len(ResumableBatchSampler([5] * 10, batch_size=4)) == 3
    with pytest.raises(DataError):
        ResumableBatchSampler([1], batch_size=0)
