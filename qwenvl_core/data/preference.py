"""OpenAI's preference (DPO) data format: one record's schema, the pair as two conversations, and its encoding.

A record (one JSONL line) is::

    {"input": {"messages": [...]},                              # the prompt, OpenAI chat messages (images too)
     "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [{"role": "assistant", "content": ...}]}

with an optional ``id`` (ours, as in SFT files). Messages are parsed exactly as in OpenAI chat files
(``formats._OpenAIParser``: text and ``image_url`` parts, roles, field paths such as
``input.messages[0].content[1].image_url.url``); each output holds exactly one assistant message without
``weight``; the two outputs must differ. ``input.tools`` / ``input.parallel_tool_calls`` are warned about and
ignored, like unknown keys elsewhere.

The pair becomes a ``PreferenceSample``: ``messages`` is the preferred conversation (prompt + preferred reply) and
``rejected`` the non-preferred one (same prompt + the other reply). Assistant turns inside the prompt get
``trainable = False``, so only the reply carries labels; with ``LabelMask.ASSISTANT_ONLY`` (which
``PreferenceDataset`` always uses) the labelled tokens are exactly the reply's content and its end-of-turn token:
the tokens whose log-probability the DPO loss compares (``qwenvl_core.training.dpo``).

``validate`` runs the SFT checks on both conversations (``parse_preference`` returns them with their field paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from qwenvl_core.conversation import Message
from qwenvl_core.data.encode import EncodedSample, EncodeOptions, LabelMask, encode_sample, tokenize_sample
from qwenvl_core.data.formats import ParsedRecord, Sample, _kind, _OpenAIParser
from qwenvl_core.data.issues import Location
from qwenvl_core.models.processing import FamilyProcessor

TOP_KEYS = frozenset({"id", "input", "preferred_output", "non_preferred_output"})
OUTPUTS = ("preferred_output", "non_preferred_output")


@dataclass
class PreferenceSample(Sample):
    """A preference pair: ``messages`` = prompt + preferred reply, ``rejected`` = prompt + non-preferred reply."""

    rejected: list[Message] = field(default_factory=list)

    def conversations(self) -> tuple[Sample, Sample]:
        """(preferred, non-preferred) as plain samples with the pair's id and location."""
        return (Sample(self.id, self.messages, self.location),
                Sample(self.id, self.rejected, self.location))


def is_preference_record(value: Any) -> bool:
    return isinstance(value, dict) and any(key in value for key in ("input", *OUTPUTS))


class _PreferenceParser(_OpenAIParser):
    """The OpenAI message parser, applied to ``input.messages[i]`` and each output's message."""

    def pair(self, value: Any) -> tuple[ParsedRecord, ParsedRecord] | None:
        if not isinstance(value, dict):
            self.error("schema", "", "expected a JSON object with 'input', 'preferred_output' and "
                       f"'non_preferred_output', got {_kind(value)}")
            return None
        for key in sorted(set(value) - TOP_KEYS):
            self.warn("unknown_key", key, "unknown key, ignored")
        prompt = self._prompt(value.get("input"))
        outputs = [self._output(value.get(name), name) for name in OUTPUTS]
        if prompt is None or outputs[0] is None or outputs[1] is None:
            return None
        preferred, rejected = outputs[0], outputs[1]
        if preferred[0] == rejected[0]:
            self.error("identical_outputs", "non_preferred_output",
                       "identical to preferred_output: the pair prefers nothing")
            return None
        sample_id = self.sample_id(value)
        return tuple(  # type: ignore[return-value]
            ParsedRecord(Sample(sample_id, prompt[0] + [out[0]], self.location), [],
                         prompt[1] + [out[1]], prompt[2] + [out[2]])
            for out in (preferred, rejected))

    def _prompt(self, raw: Any) -> tuple[list[Message], list[str], list[list[str]]] | None:
        if not isinstance(raw, dict):
            got = "missing" if raw is None else _kind(raw)
            self.error("schema", "input", f"expected an object with 'messages', got {got}")
            return None
        for key in sorted(set(raw) - {"messages"}):
            self.warn("unknown_key", f"input.{key}", "unknown key, ignored")
        items = raw.get("messages")
        if not isinstance(items, list) or not items:
            got = "missing" if items is None else "empty" if isinstance(items, list) else _kind(items)
            self.error("schema", "input.messages", f"expected a non-empty list of messages, got {got}")
            return None
        messages: list[Message] = []
        fields: list[str] = []
        parts: list[list[str]] = []
        for i, item in enumerate(items):
            path = f"input.messages[{i}]"
            parsed = self._one(item, path)
            if parsed is None:
                return None
            # the prompt's assistant turns are context: only the output reply is compared
            messages.append(replace(parsed[0], trainable=False) if parsed[0].role == "assistant" else parsed[0])
            fields.append(path)
            parts.append(parsed[1])
        if messages[-1].role != "user":
            self.error("role_order", fields[-1], f"the prompt must end with a 'user' message (the outputs answer "
                       f"it), got {messages[-1].role!r}")
            return None
        return messages, fields, parts

    def _output(self, raw: Any, name: str) -> tuple[Message, str, list[str]] | None:
        if not isinstance(raw, list) or len(raw) != 1:
            got = ("missing" if raw is None else f"{len(raw)} messages" if isinstance(raw, list) else _kind(raw))
            self.error("schema", name, f"expected a list of exactly one assistant message, got {got}")
            return None
        path = f"{name}[0]"
        if isinstance(raw[0], dict) and "weight" in raw[0]:
            self.error("schema", f"{path}.weight", "weight is not allowed in a preference output")
            return None
        if isinstance(raw[0], dict) and raw[0].get("role") != "assistant":
            self.error("unknown_role", f"{path}.role",
                       f"an output must be an 'assistant' message, got role {raw[0].get('role')!r}")
            return None
        parsed = self._one(raw[0], path)
        return None if parsed is None else (parsed[0], path, parsed[1])

    def _one(self, item: Any, path: str) -> tuple[Message, list[str]] | None:
        if not isinstance(item, dict):
            self.error("schema", path, f"expected an object, got {_kind(item)}")
            return None
        return self.message(item, path)


def parse_preference(value: Any, location: Location, base_dir: Path
                     ) -> tuple[tuple[ParsedRecord, ParsedRecord] | None, list[Any]]:
    """The record's two conversations (preferred, non-preferred) with field paths, or None, and the schema issues."""
    parser = _PreferenceParser(location, base_dir)
    pair = parser.pair(value)
    return pair, parser.issues


@dataclass
class PreferencePair:
    """One encoded pair: the preferred and the non-preferred row (labels only on each reply)."""

    chosen: EncodedSample
    rejected: EncodedSample

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def preference_options(options: EncodeOptions) -> EncodeOptions:
    """``options`` with the assistant-only mask: the reply's content and end-of-turn token are its labels."""
    return replace(options, mask=LabelMask.ASSISTANT_ONLY)


class PreferenceDataset(Dataset[PreferencePair]):
    """Map-style dataset of ``PreferenceSample``s encoded on access (``SFTDataset``'s interface)."""

    def __init__(self, samples: Sequence[Sample], processor: FamilyProcessor,
                 options: EncodeOptions | None = None) -> None:
        self.samples = [s for s in samples if isinstance(s, PreferenceSample)]
        if len(self.samples) != len(samples):
            raise TypeError("PreferenceDataset takes PreferenceSample objects only")
        self.processor, self.options = processor, preference_options(options or EncodeOptions())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PreferencePair:
        chosen, rejected = self.samples[index].conversations()
        return PreferencePair(encode_sample(chosen, self.processor, self.options),
                              encode_sample(rejected, self.processor, self.options))

    def lengths(self) -> list[int]:
        """Tokens of both rows of every pair (length grouping)."""
        out = []
        for sample in self.samples:
            chosen, rejected = sample.conversations()
            out.append(sum(len(tokenize_sample(s, self.processor, self.options).input_ids)
                           for s in (chosen, rejected)))
        return out
