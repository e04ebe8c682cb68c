"""The chat layout of the transformers-native Qwen VL families in token ids, turn by turn, equal to the official chat
template's tokenization (``processor.apply_chat_template(..., tokenize=True)``; tested per family).

A turn is ``<|im_start|>`` + ``role\\n`` + content + ``<|im_end|>`` + ``\\n``. A conversation without a system message
first gets the family's default system turn (``FamilySpec.default_system_prompt``: Qwen2-VL / Qwen2.5-VL
``You are a helpful assistant.``, Qwen3-VL none); the generation prompt is ``<|im_start|>assistant\\n``. An image part
is ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``, n the image's merged patches (given by the
processor, which knows the image sizes); a role whose images the template drops (``FamilySpec.image_roles``) is
refused instead.

The template's text is tokenized piece by piece between special tokens, and so is ours: the role name, its newline
and the text the content starts with are one piece (a content starting with a newline merges it with the header's,
as in the official ids); the header keeps the tokens that lie within ``role\\n``. Unlike the rendered template,
message text never becomes structure: special-token surface forms written in a message (``<|im_start|>``,
``<|vision_start|>`` ...) are tokenized as plain text (``TextEncoder``), so a message cannot forge turns or image
spans, except the family's grounding markup tokens (``FamilySpec.markup_tokens``: Qwen2-VL's ``<|box_start|>`` ...),
which become their ids as in the template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.errors import PromptError, TokenizerError
from qwenvl_core.models.hf_vl.spec import FamilySpec
from qwenvl_core.models.processing import EncodedConversation, TurnTokens
from qwenvl_core.models.qwen_vl.chat import with_system_turn  # the conversation checks shared with v1

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


class TextEncoder:
    """Message text as ids: special-token surface forms are plain text, the ``markup`` tokens are their ids."""

    def __init__(self, backend: Any, markup: Mapping[str, int]) -> None:
        from tokenizers import Tokenizer

        # A private copy with special tokens encoded as text: toggling the shared tokenizer's flag per call (as
        # transformers' split_special_tokens does) would race with other threads using it.
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.encode_special_tokens = True
        self._markup = dict(markup)
        self._split = re.compile("(" + "|".join(map(re.escape, markup)) + ")") if markup else None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as message content."""
        if self._split is None:
            return self._plain(text)
        ids: list[int] = []
        for index, piece in enumerate(self._split.split(text)):
            ids += [self._markup[piece]] if index % 2 else self._plain(piece)
        return ids

    def encode_after(self, prefix: str, text: str) -> tuple[list[int], list[int]]:
        """``prefix + text`` tokenized as one piece (as the template's rendering is), split into the tokens within
        ``prefix`` and the rest; ``prefix`` (a role and its newline) holds no markup."""
        ids = self.encode(prefix + text)
        for cut in (len(prefix), len(prefix.rstrip())):  # a trailing newline may merge with the text's
            head = self._plain(prefix[:cut])
            if ids[:len(head)] == head:
                return head, ids[len(head):]
        raise TokenizerError(f"cannot split the tokens of {prefix!r} from the text after it")

    def _plain(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []


class ChatEncoder:
    """Conversations of one family as ``EncodedConversation`` (see the module docstring)."""

    def __init__(self, spec: FamilySpec, backend: Any) -> None:
        def token_id(token: str) -> int:
            found = backend.token_to_id(token)
            if found is None:
                raise TokenizerError(f"the {spec.name.value} tokenizer has no {token} token")
            return int(found)

        self.spec = spec
        self.im_start, self.im_end = token_id(IM_START), token_id(IM_END)
        self.vision_start, self.vision_end, self.image_pad = (token_id(t) for t in (VISION_START, VISION_END,
                                                                                    IMAGE_PAD))
        self.text = TextEncoder(backend, {token: token_id(token) for token in spec.markup_tokens})
        self._newline = self.text.encode("\n")
        self.generation_ids = [self.im_start] + self.text.encode("assistant\n")

    def encode(self, messages: Sequence[Message], image_tokens: Sequence[int],
               add_generation_prompt: bool = False) -> EncodedConversation:
        """``messages`` turn by turn; ``image_tokens[k]``: the span length of the conversation's k-th image."""
        checked = self._checked(messages)
        if sum(len(m.images) for m in checked) != len(image_tokens):
            raise PromptError(f"{len(image_tokens)} image sizes for {sum(len(m.images) for m in checked)} images")
        turns: list[TurnTokens] = []
        seen = 0
        for message in checked:
            n = len(message.images)
            turns.append(self._turn(message, image_tokens[seen:seen + n]))
            seen += n
        generation = list(self.generation_ids) if add_generation_prompt else []
        return EncodedConversation(
            input_ids=[i for turn in turns for i in turn.ids] + generation,
            turns=turns,
            images=[image for turn in turns for image in turn.images],
            generation_ids=generation,
        )

    def _checked(self, messages: Sequence[Message]) -> list[Message]:
        default = self.spec.default_system_prompt
        checked = with_system_turn(messages, default or "")
        if default is None and messages[0].role != "system":
            checked = checked[1:]  # the template adds no system turn
        for index, message in enumerate(messages):
            if message.images and message.role not in self.spec.image_roles:
                raise PromptError(
                    f"message {index} ({message.role}) has an image, but the {self.spec.name.value} chat template "
                    f"shows images only in {' / '.join(self.spec.image_roles)} messages")
        return checked

    def _turn(self, message: Message, image_tokens: Sequence[int]) -> TurnTokens:
        runs = _runs(message)
        header_text = f"{message.role}\n"
        if runs and isinstance(runs[0], str):
            role_ids, content = self.text.encode_after(header_text, runs.pop(0))
        else:
            role_ids, content = self.text.encode(header_text), []
        spans = iter(image_tokens)
        for run in runs:
            content += self.text.encode(run) if isinstance(run, str) else self._span(next(spans))
        return TurnTokens(
            role=message.role,
            header_ids=[self.im_start] + role_ids,
            content_ids=content,
            footer_ids=[self.im_end] + self._newline,
            images=message.images,
            trainable=message.trainable,
        )

    def _span(self, n_tokens: int) -> list[int]:
        return [self.vision_start] + [self.image_pad] * n_tokens + [self.vision_end]


def _runs(message: Message) -> list[str | ImagePart]:
    """The content as runs: adjacent text parts joined (the template concatenates them), images in place."""
    runs: list[str | ImagePart] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            if not part.text:
                continue
            if runs and isinstance(runs[-1], str):
                runs[-1] += part.text
            else:
                runs.append(part.text)
        else:
            runs.append(part)
    return runs
