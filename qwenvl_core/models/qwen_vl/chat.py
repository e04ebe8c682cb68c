"""ChatML layout of Qwen-VL v1 conversations, as token ids (for the model) and as text (for humans).

This module owns the turn layout of the official ``finetune.py`` / ``make_context``: a turn is
``[<|im_start|>] + enc(role) + enc("\\n") + enc(content) + [<|im_end|>] + enc("\\n")``, each piece tokenized
separately (BPE merges never cross piece boundaries); the system turn comes first; the generation prompt is
``[<|im_start|>] + enc("assistant") + enc("\\n")``. An image part becomes ``Picture k: `` + image span + ``\\n``
with k counting images over the whole conversation from 1; the span is ``tokenizer.image_span(n_queries)``
where the official code puts ``<img>path</img>``. Text is encoded as ``make_context`` does
(``tokenizer.encode_content``): grounding tags become their ids, but ``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>`` and the other specials written in a message stay plain text, so message text can never open
or close a turn (in serving and in training data alike). It also converts official-format text with
``<img>path</img>`` markup into ``TextPart`` / ``ImagePart`` lists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from qwenvl_core.conversation import ROLES, ImagePart, Message, Part, TextPart, text_message
from qwenvl_core.errors import PromptError
from qwenvl_core.models.processing import EncodedConversation, TurnTokens
from qwenvl_core.models.qwen_vl.tokenizer import IM_END, IM_START, QWenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Official placeholder: "Picture k: <img>path</img>\n" (from_list_format writes "Picture k:" without a space).
_OFFICIAL_IMAGE = re.compile(r"(?:Picture \d+: ?)?<img>(?P<src>[^<]*)</img>\n?")
_IMAGE_TAGS = re.compile(r"<img>|</img>|<imgpad>")

# A run of content: text to tokenize, or an image whose span goes in its place.
_Run = str | ImagePart


def split_image_markup(text: str) -> list[Part]:
    """Official-format text (``Picture k: <img>path</img>\\n...``) as text and image parts.

    The ``Picture k: `` prefix and the newline after ``</img>`` are dropped: the encoder writes them back,
    numbered over the whole conversation.
    """
    parts: list[Part] = []
    pos = 0
    for match in _OFFICIAL_IMAGE.finditer(text):
        _append_text(parts, text[pos : match.start()])
        source = match["src"].strip()
        if not source:
            raise PromptError(f"empty image path in {match.group(0)!r}")
        parts.append(ImagePart(source))
        pos = match.end()
    _append_text(parts, text[pos:])
    return parts


def _append_text(parts: list[Part], text: str) -> None:
    if not text:
        return
    if _IMAGE_TAGS.search(text):
        raise PromptError(f"malformed image markup (expected <img>path</img>) in {text[:80]!r}")
    parts.append(TextPart(text))


def _content_runs(message: Message, image_counter: int) -> list[_Run]:
    """Text runs and images of a message; each image is preceded by "Picture k: " and followed by "\\n"."""
    runs: list[_Run] = []
    text = ""
    for part in message.parts:
        if isinstance(part, TextPart):
            if _IMAGE_TAGS.search(part.text):
                raise PromptError(
                    f"a {message.role} message has image markup in its text ({part.text[:60]!r}); "
                    "images must be image parts (see split_image_markup)"
                )
            text += part.text
            continue
        image_counter += 1
        runs += [text + f"Picture {image_counter}: ", part]
        text = "\n"
    return [*runs, text] if text else runs


def encode_turn(tokenizer: QWenTokenizer, message: Message, n_queries: int, image_counter: int) -> TurnTokens:
    """Encode one turn; ``image_counter`` is the number of images in the turns before it."""
    _check_role(message.role)
    content: list[int] = []
    for run in _content_runs(message, image_counter):
        content += tokenizer.image_span(n_queries) if isinstance(run, ImagePart) else tokenizer.encode_content(run)
    newline = tokenizer.encode("\n")
    return TurnTokens(
        role=message.role,
        header_ids=[tokenizer.im_start_id] + tokenizer.encode_content(message.role) + newline,
        content_ids=content,
        footer_ids=[tokenizer.im_end_id] + newline,
        images=message.images,
        trainable=message.trainable,
    )


def generation_prompt_ids(tokenizer: QWenTokenizer) -> list[int]:
    """``<|im_start|>assistant\\n`` as the model is prompted to answer."""
    return [tokenizer.im_start_id] + tokenizer.encode_content("assistant") + tokenizer.encode("\n")


def encode_conversation(
    tokenizer: QWenTokenizer,
    messages: Sequence[Message],
    n_queries: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Encode a conversation; ``system_prompt`` is used unless the first message is a system message."""
    turns: list[TurnTokens] = []
    image_counter = 0
    for message in with_system_turn(messages, system_prompt):
        turns.append(encode_turn(tokenizer, message, n_queries, image_counter))
        image_counter += len(turns[-1].images)
    generation = generation_prompt_ids(tokenizer) if add_generation_prompt else []
    return EncodedConversation(
        input_ids=[i for turn in turns for i in turn.ids] + generation,
        turns=turns,
        images=[image for turn in turns for image in turn.images],
        generation_ids=generation,
    )


def render_chatml(
    messages: Sequence[Message],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as ChatML text, images as ``<img>{path or "image"}</img>`` (for reading and tests)."""
    out: list[str] = []
    image_counter = 0
    for message in with_system_turn(messages, system_prompt):
        runs = _content_runs(message, image_counter)
        image_counter += len(message.images)
        content = "".join(f"<img>{_image_label(r)}</img>" if isinstance(r, ImagePart) else r for r in runs)
        out.append(f"{IM_START}{message.role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _image_label(image: ImagePart) -> str:
    source = image.source
    if isinstance(source, Path) or (isinstance(source, str) and not source.startswith("data:")):
        return str(source)
    return "image"


def with_system_turn(
    messages: Sequence[Message], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> list[Message]:
    """Check the conversation and put a system turn first (``system_prompt`` unless one is given)."""
    if not messages:
        raise PromptError("the conversation is empty")
    for index, message in enumerate(messages):
        _check_role(message.role)
        if message.role == "system" and index > 0:
            raise PromptError(f"message {index} is a system message; only the first message may be one")
    if messages[0].role == "system":
        if len(messages) == 1:
            raise PromptError("the conversation has a system message but no user or assistant message")
        return list(messages)
    return [text_message("system", system_prompt), *messages]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise PromptError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
