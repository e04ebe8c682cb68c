"""Reading a job's training / validation files into encoded datasets, and the global batch plan across ranks.

What this adds on top of ``qwenvl_core.data`` (which it only uses): opening the job's files (bare or bundles,
kept open for the run), a dataset that caches encoded samples of small files, and ``BatchPlan``: one
deterministic plan of **global** micro-batches (``micro_batch_size x world_size`` samples, from
``data.ResumableBatchSampler`` with ``drop_last``), from which every rank takes its own slice. Because the plan
is global, the position to resume from is one number for all ranks, and the sample ids consumed are the
same whatever the number of restarts. Incomplete global batches at an epoch's end are dropped, as are
micro-batches that do not fill a whole optimizer step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from qwenvl_core.data import (
    BundleError,
    DataFormat,
    EncodeOptions,
    LabelMask,
    LengthPolicy,
    ResumableBatchSampler,
    Sample,
    SFTDataset,
    ValidationOptions,
    iter_samples,
    open_bundle,
    validate_bundle,
)
from qwenvl_core.data.issues import DataError
from qwenvl_core.data.preference import PreferenceDataset
from qwenvl_core.models.processing import FamilyProcessor
from qwenvl_core.specs import Hyperparameters

CACHE_LIMIT = 4096  # encoded samples (with pixels) kept in memory per dataset


def encode_options(hp: Hyperparameters) -> EncodeOptions:
    return EncodeOptions(mask=LabelMask(hp.loss_mask.value), max_length=hp.max_length,
                         length_policy=LengthPolicy(hp.length_policy))


class CachedDataset(Dataset[Any]):
    """``SFTDataset`` (or, for DPO, ``PreferenceDataset``: encoded pairs) that keeps encoded items (pixels
    included) of files up to ``CACHE_LIMIT`` items."""

    def __init__(self, samples: Sequence[Sample], processor: FamilyProcessor, options: EncodeOptions,
                 preference: bool = False) -> None:
        self.inner: SFTDataset | PreferenceDataset = (PreferenceDataset if preference else SFTDataset)(
            samples, processor, options)
        self.samples = self.inner.samples
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        hit = self._cache.get(index)
        if hit is None:
            hit = self.inner[index]
            if len(self._cache) < CACHE_LIMIT:
                self._cache[index] = hit
        return hit


@dataclass
class JobData:
    """The job's datasets and their validation reports (``ValidationReport.to_dict()``)."""

    train: CachedDataset
    validation: CachedDataset | None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        """Flat dataset statistics for tracking: ``train.samples``, ``train.images``, ..."""
        out: dict[str, Any] = {}
        for split, report in self.reports.items():
            for key, value in report.get("stats", {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out[f"{split}.{key}"] = value
        return out


def read_split(path: str | Path, processor: FamilyProcessor, options: EncodeOptions, stack: ExitStack,
               field_name: str, preference: bool = False, work_dir: Path | None = None
               ) -> tuple[list[Sample], dict[str, Any]]:
    """Validate and read one file; a bundle is extracted once, into ``work_dir`` (the job's scratch folder, on the
    volume the operator gave jobs; None: the system's temporary folder), and stays there until ``stack`` closes.
    Errors name the field. ``preference``: the job is DPO, so the file must be in the preference format (and only
    then)."""
    voptions = ValidationOptions(encode=options)
    try:
        bundle = stack.enter_context(open_bundle(path, voptions.bundle_limits, work_dir))
    except BundleError as exc:
        raise DataError(f"{field_name}: {Path(path).name} is not valid ({exc})") from exc
    report = validate_bundle(bundle, processor, voptions)
    if not report.ok:
        first = report.issues.errors[0] if report.issues.errors else "no samples"
        raise DataError(f"{field_name}: {Path(path).name} is not valid ({report.issues.error_count} errors; "
                        f"first: {first})")
    if preference != (report.format is DataFormat.PREFERENCE):
        fmt = report.format.value if report.format else "unknown"
        need = ("method 'dpo' trains on preference pairs: each line {\"input\": {\"messages\": [...]}, "
                "\"preferred_output\": [...], \"non_preferred_output\": [...]}" if preference else
                "preference pairs train with method {\"type\": \"dpo\"}")
        raise DataError(f"{field_name}: {Path(path).name} is in the {fmt} format; {need}")
    return list(iter_samples(bundle, processor, voptions)), report.to_dict()


def load_job_data(train_file: str, validation_file: str | None, processor: FamilyProcessor,
                  hp: Hyperparameters, stack: ExitStack, max_val_samples: int | None = None,
                  preference: bool = False, work_dir: Path | None = None) -> JobData:
    """The job's datasets; ``preference`` (method DPO): preference files, encoded as pairs; bundles extracted into
    ``work_dir``."""
    options = encode_options(hp)
    train, train_report = read_split(train_file, processor, options, stack, "train_file", preference, work_dir)
    data = JobData(CachedDataset(train, processor, options, preference), None, {"train": train_report})
    if validation_file:
        val, val_report = read_split(validation_file, processor, options, stack, "validation_file", preference,
                                     work_dir)
        data.validation = CachedDataset(val[:max_val_samples] if max_val_samples else val, processor, options,
                                        preference)
        data.reports["validation"] = val_report
    return data


class BatchPlan:
    """Global micro-batches per epoch (seeded, length-grouped) and each rank's slice of them."""

    def __init__(self, lengths: Sequence[int], hp: Hyperparameters, world_size: int, seed: int) -> None:
        self.micro, self.world, self.accum = hp.micro_batch_size, world_size, hp.gradient_accumulation_steps
        self.sampler = ResumableBatchSampler(lengths, self.micro * world_size, seed=seed,
                                             group_by_length=hp.group_by_length, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"train_file: {len(lengths)} samples do not fill one optimizer step of "
                            f"{self.micro * world_size * self.accum} samples (batch_size x workers)")

    def global_batches(self, epoch: int, start: int) -> Iterator[list[int]]:
        """Micro-batches of ``epoch`` from position ``start`` (in micro-batches), whole steps only."""
        plan = self.sampler.plan(epoch)[: self.steps_per_epoch * self.accum]
        yield from plan[start:]

    def rank_slice(self, batch: list[int], rank: int) -> list[int]:
        return batch[rank * self.micro: (rank + 1) * self.micro]

    def state(self, epoch: int, position: int) -> dict[str, Any]:
        self.sampler.epoch = epoch
        return self.sampler.state_dict(consumed=position)

    def restore(self, state: dict[str, Any]) -> tuple[int, int]:
        self.sampler.load_state_dict(state)
        return self.sampler.epoch, self.sampler.position


def update_digest(digest: str, sample_ids: Sequence[str]) -> str:
    """Chain ``digest`` with the ids of one global micro-batch: equal digests mean equal data order."""
    return hashlib.sha256((digest + "|" + ",".join(sample_ids)).encode("utf-8")).hexdigest()
