"""Instruction datasets: the two input formats, safe bundles, streaming validation, statistics, SFT encoding,
batching, resumable sampling and synthetic data.

Modules (each states what it owns): ``issues`` (locations, issues, error types), ``reader`` (streaming JSON /
JSONL records), ``formats`` (official Qwen-VL and OpenAI schemas -> ``Sample``), ``checks`` (per-sample rules),
``bundle`` (safe archive extraction), ``validate`` (the streaming report), ``stats`` (statistics and estimates),
``encode`` (ChatML ids + label masks + pixels), ``collate`` (padding, length grouping, packing), ``sampler``
(resumable samplers), ``synth`` (coloured-shape data), ``preference`` (OpenAI's preference (DPO) format and its
encoding).
"""

from qwenvl_core.data.bundle import Bundle, BundleLimits, open_bundle, write_bundle
from qwenvl_core.data.checks import SampleRules
from qwenvl_core.data.collate import (
    Collator,
    PackedSample,
    length_grouped_batches,
    naive_batches,
    pack_samples,
    padding_ratio,
)
from qwenvl_core.data.encode import (
    IGNORE_INDEX,
    EncodedSample,
    EncodeOptions,
    LabelMask,
    LengthError,
    LengthPolicy,
    SFTDataset,
    TokenizedSample,
    encode_sample,
    tokenize_sample,
)
from qwenvl_core.data.formats import DataFormat, Sample, to_openai_record, to_qwen_record
from qwenvl_core.data.issues import BundleError, DataError, Issue, Location, Severity
from qwenvl_core.data.sampler import ResumableBatchSampler, ResumableSampler
from qwenvl_core.data.stats import DatasetStats, TrainingEstimate, estimate_training
from qwenvl_core.data.synth import SynthResult, write_synth_dataset
from qwenvl_core.data.validate import (
    ValidationOptions,
    ValidationReport,
    iter_samples,
    read_samples,
    validate_bundle,
    validate_file,
)

__all__ = [
    "IGNORE_INDEX", "Bundle", "BundleError", "BundleLimits", "Collator", "DataError", "DataFormat",
    "DatasetStats", "EncodeOptions", "EncodedSample", "Issue", "LabelMask", "LengthError", "LengthPolicy",
    "Location", "PackedSample", "ResumableBatchSampler", "ResumableSampler", "SFTDataset", "Sample",
    "SampleRules", "Severity", "SynthResult", "TokenizedSample", "TrainingEstimate", "ValidationOptions",
    "ValidationReport", "encode_sample", "estimate_training", "iter_samples", "length_grouped_batches",
    "naive_batches", "open_bundle", "pack_samples", "padding_ratio", "read_samples", "to_openai_record",
    "to_qwen_record", "tokenize_sample", "validate_bundle", "validate_file", "write_bundle", "write_synth_dataset",
]
