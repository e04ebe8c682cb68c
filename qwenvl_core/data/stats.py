"""Dataset statistics accumulated in one streaming pass, and training token / time estimates.

``DatasetStats`` counts samples, turns, images and, when a tokenizer is available, text, image and supervised
tokens plus a histogram of sample lengths (fixed power-of-two buckets, so memory does not grow with the data).
``estimate_training`` turns the token total into training tokens for a number of epochs and a time from a
measured throughput figure (tokens per second on the target hardware); the API's estimate endpoint uses it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from qwenvl_core.data.encode import TokenizedSample
from qwenvl_core.data.formats import Sample
from qwenvl_core.errors import QwenVLError

# Upper bounds (exclusive) of the length histogram buckets; the last bucket is open-ended.
HISTOGRAM_EDGES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class DatasetStats:
    """Totals over the valid samples of a file (token fields stay None without a tokenizer)."""

    samples: int = 0
    turns: int = 0
    assistant_turns: int = 0
    images: int = 0
    truncated_samples: int = 0
    text_tokens: int | None = None
    image_tokens: int | None = None
    supervised_tokens: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    histogram: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_EDGES) + 1))

    def add(self, sample: Sample, tokenized: TokenizedSample | None = None) -> None:
        """Count one valid sample (and its tokens when ``tokenized`` is given)."""
        self.samples += 1
        self.turns += len(sample.messages)
        self.assistant_turns += sum(1 for m in sample.messages if m.role == "assistant")
        if tokenized is None:
            self.images += sum(len(m.images) for m in sample.messages)
            return
        self.images += len(tokenized.images)
        self.truncated_samples += int(tokenized.truncated)
        n = len(tokenized.input_ids)
        self.text_tokens = (self.text_tokens or 0) + n - tokenized.image_tokens
        self.image_tokens = (self.image_tokens or 0) + tokenized.image_tokens
        self.supervised_tokens = (self.supervised_tokens or 0) + tokenized.supervised_tokens
        self.min_length = n if self.min_length is None else min(self.min_length, n)
        self.max_length = n if self.max_length is None else max(self.max_length, n)
        self.histogram[bisect.bisect_right(HISTOGRAM_EDGES, n)] += 1

    @property
    def total_tokens(self) -> int | None:
        """Text plus image tokens, or None without a tokenizer."""
        if self.text_tokens is None or self.image_tokens is None:
            return None
        return self.text_tokens + self.image_tokens

    def histogram_rows(self) -> list[dict[str, Any]]:
        """``[{"range": "128-255", "samples": n}, ...]`` for reports."""
        lows = (0, *HISTOGRAM_EDGES)
        highs = (*(e - 1 for e in HISTOGRAM_EDGES), None)
        return [{"range": f"{lo}-{hi}" if hi is not None else f"{lo}+", "samples": n}
                for lo, hi, n in zip(lows, highs, self.histogram, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        mean = self.total_tokens / self.samples if self.total_tokens is not None and self.samples else None
        return {
            "samples": self.samples, "turns": self.turns, "assistant_turns": self.assistant_turns,
            "images": self.images, "truncated_samples": self.truncated_samples,
            "text_tokens": self.text_tokens, "image_tokens": self.image_tokens,
            "supervised_tokens": self.supervised_tokens, "total_tokens": self.total_tokens,
            "min_length": self.min_length, "max_length": self.max_length,
            "mean_length": round(mean, 1) if mean is not None else None,
            "length_histogram": self.histogram_rows(),
        }


@dataclass(frozen=True)
class TrainingEstimate:
    """Tokens a run will process and how long it should take at the given throughput."""

    epochs: int
    train_tokens: int
    tokens_per_second: float | None
    seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "estimated_train_tokens": self.train_tokens,
                "tokens_per_second": self.tokens_per_second, "estimated_seconds": self.seconds}


def estimate_training(stats: DatasetStats, epochs: int, tokens_per_second: float | None = None
                      ) -> TrainingEstimate:
    """Training tokens (all tokens of all samples, every epoch) and, given a throughput, the time."""
    if stats.total_tokens is None:
        raise QwenVLError("token estimates need a tokenizer: validate with a model directory")
    if epochs < 1:
        raise QwenVLError(f"epochs must be >= 1, got {epochs}")
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise QwenVLError(f"tokens_per_second must be positive, got {tokens_per_second}")
    tokens = stats.total_tokens * epochs
    seconds = tokens / tokens_per_second if tokens_per_second else None
    return TrainingEstimate(epochs, tokens, tokens_per_second, seconds)
