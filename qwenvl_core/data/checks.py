"""Semantic checks of one parsed sample: roles and their order, trainable turns, empty content, images per
sample and where images may appear, and grounding box markup.

These rules are format-independent (they run on ``Sample`` messages) but report the JSON field path of the
offending message or part as recorded by ``formats``. Image decoding, duplicate ids and length are checked by
``validate``, which owns the state that spans samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.data.formats import ParsedRecord, Sample
from qwenvl_core.data.issues import Issue, Severity
from qwenvl_core.models.qwen_vl.grounding import validate_box_markup

DEFAULT_MAX_IMAGES = 10


@dataclass(frozen=True)
class SampleRules:
    """Per-sample limits."""

    max_images: int = DEFAULT_MAX_IMAGES


@dataclass(frozen=True)
class _View:
    """A parsed sample with the field path of each message and part."""

    sample: Sample
    message_fields: list[str]
    part_fields: list[list[str]]

    @property
    def top(self) -> str:
        """The name of the list of turns (``messages`` or ``conversations``)."""
        return self.message_fields[0].split("[", 1)[0] if self.message_fields else ""

    def issue(self, code: str, message: str, path: str, severity: Severity = Severity.ERROR) -> Issue:
        return Issue(code, message, self.sample.location, path, severity)


def check_sample(parsed: ParsedRecord, rules: SampleRules) -> list[Issue]:
    """All semantic problems of a fully parsed sample (empty if it is fine)."""
    if parsed.sample is None:
        return []
    view = _View(parsed.sample, parsed.message_fields, parsed.part_fields)
    return _role_order(view) + _trainable(view) + _content(view) + _images(view, rules)


def _role_order(view: _View) -> list[Issue]:
    issues: list[Issue] = []
    expected = "user"
    for i, (msg, path) in enumerate(zip(view.sample.messages, view.message_fields, strict=True)):
        if msg.role == "system":
            if i != 0:
                issues.append(view.issue("role_order", "a system message is only allowed first", path))
            continue
        if msg.role != expected:
            issues.append(view.issue("role_order", f"expected a {expected!r} message here, got {msg.role!r} "
                                     "(turns must alternate user, assistant, user, ...)", path))
        expected = "assistant" if msg.role == "user" else "user"
    return issues


def _trainable(view: _View) -> list[Issue]:
    messages = view.sample.messages
    if not any(m.role == "assistant" for m in messages):
        return [view.issue("no_trainable_turn", "nothing to train on: no assistant message", view.top)]
    if not any(m.role == "assistant" and m.trainable for m in messages):
        return [view.issue("no_trainable_turn", "nothing to train on: every assistant message has weight 0",
                           view.top)]
    if messages[-1].role != "assistant":
        return [view.issue("trailing_turn", "the last message is not an assistant reply; it carries no loss",
                           view.message_fields[-1], Severity.WARNING)]
    return []


def _content(view: _View) -> list[Issue]:
    issues: list[Issue] = []
    rows = zip(view.sample.messages, view.message_fields, view.part_fields, strict=True)
    for msg, path, part_paths in rows:
        if not _has_content(msg):
            issues.append(view.issue("empty_content", "empty content", path))
        for part, part_path in zip(msg.parts, part_paths, strict=True):
            if isinstance(part, TextPart):
                issues += [view.issue("box", p, part_path) for p in validate_box_markup(part.text)]
    return issues


def _has_content(msg: Message) -> bool:
    return any(isinstance(p, ImagePart) or p.text.strip() for p in msg.parts)


def _images(view: _View, rules: SampleRules) -> list[Issue]:
    issues: list[Issue] = []
    count = 0
    for msg, part_paths in zip(view.sample.messages, view.part_fields, strict=True):
        for part, path in zip(msg.parts, part_paths, strict=True):
            if isinstance(part, ImagePart):
                count += 1
                if msg.role != "user":
                    issues.append(view.issue("image_role", f"images are only allowed in user messages, "
                                             f"not in {msg.role} messages", path))
    if count > rules.max_images:
        issues.append(view.issue("too_many_images", f"{count} images in one sample; the limit is "
                                 f"{rules.max_images}", view.top))
    return issues
