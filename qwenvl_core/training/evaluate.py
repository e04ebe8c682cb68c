"""Evaluation on the validation file: loss, token accuracy, exact match and grounding accuracy (IoU >= 0.5).

- ``loss``: mean cross-entropy per supervised token (the training label mask), ``token_accuracy``: the share
  of supervised tokens predicted exactly (argmax, teacher forcing).
- Task metrics on samples whose last turn is a short assistant answer (at most ``max_new_tokens`` tokens as the
  family encodes it): the prompt (every turn before it) is completed greedily. The reference is the answer as the
  model is trained to say it (its encoded ids decoded: dataset grounding markup already in the family's own
  convention). ``grounding_accuracy`` counts answers whose first predicted box has IoU >= 0.5 with the reference's
  first box, both read in pixels of the prompt's last image by the family's codec (``processor.parse_boxes``), so
  every family's convention (0-1000 grid, resized pixels, ...) is compared in one frame; ``exact_match`` compares
  the normalised text of the other answers.
- ``base_and_finetuned`` evaluates the same data with the adapter disabled (peft ``disable_adapter``), so every
  job reports base vs fine-tuned.

Every rank calls these functions on the same data (ZeRO-3 needs every rank in each forward); only rank 0's
numbers are reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenvl_core.data import IGNORE_INDEX, Collator, EncodedSample, Sample
from qwenvl_core.devices import model_device
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.grounding import ImageSize, PixelBox
from qwenvl_core.grounding.geometry import iou
from qwenvl_core.images import image_size
from qwenvl_core.models.processing import FamilyProcessor, VisionInputs
from qwenvl_core.specs import EvalSpec

EVAL_BATCH = 8


@dataclass(frozen=True)
class TaskItem:
    """One short-answer question: prompt ids, its images' vision inputs, the dataset's answer, the reference text
    (the answer as the family encodes it, decoded), and for a grounding answer the image's size and its boxes."""

    prompt_ids: list[int]
    vision: VisionInputs | None
    answer: str
    reference: str = ""
    image_size: ImageSize | None = None  # (width, height) of the prompt's last image: the boxes' frame
    boxes: tuple[PixelBox, ...] = ()  # the reference's boxes in pixels; empty: an exact-match question


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, rows: Sequence[EncodedSample], collator: Collator
                      ) -> dict[str, float]:
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(rows), EVAL_BATCH):
        batch = collator(rows[start: start + EVAL_BATCH])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()  # [B, T-1, V]
        targets = labels[:, 1:]  # [B, T-1]
        mask = targets != IGNORE_INDEX
        total_loss += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        correct += int((logits.argmax(-1)[mask] == targets[mask]).sum())
        count += int(mask.sum())
    return {"loss": total_loss / max(1, count), "token_accuracy": correct / max(1, count)}


def task_items(samples: Sequence[Sample], processor: FamilyProcessor, max_new_tokens: int) -> list[TaskItem]:
    """Samples ending in a short assistant answer, as prompts (pixels loaded) and references (module docstring)."""
    items: list[TaskItem] = []
    for sample in samples:
        last = sample.messages[-1]
        if last.role != "assistant" or last.images or not last.text:
            continue
        answer_ids = processor.encode_conversation(sample.messages).turns[-1].content_ids
        if len(answer_ids) > max_new_tokens:
            continue
        prompt = processor.encode_chat(sample.messages[:-1], add_generation_prompt=True)
        reference = processor.decode(answer_ids)
        size = image_size(prompt.images[-1].source, limits=processor.image_limits) if prompt.images else None
        boxes = tuple(o.box for o in processor.parse_boxes(reference, size)) if size else ()
        items.append(TaskItem(prompt.input_ids, prompt.vision, last.text, reference, size, boxes))
    return items


def _generate(model: torch.nn.Module, items: Sequence[TaskItem], processor: FamilyProcessor,
              params: SamplingParams) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(items), EVAL_BATCH):
        chunk = items[start: start + EVAL_BATCH]
        outs = generate(model, [i.prompt_ids for i in chunk], pad_token_id=processor.pad_token_id,
                        params=params, vision=VisionInputs.concat(i.vision for i in chunk),
                        decode=processor.decode)
        texts.extend(o.text or "" for o in outs)
    return texts


def task_metrics(model: torch.nn.Module, items: Sequence[TaskItem], processor: FamilyProcessor,
                 max_new_tokens: int, stop_ids: Sequence[int]) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids),
                            suppress_token_ids=processor.image_token_ids)
    texts = _generate(model, items, processor, params) if items else []
    return score_answers(items, texts, processor)


def score_answers(items: Sequence[TaskItem], texts: Sequence[str], processor: FamilyProcessor) -> dict[str, float]:
    """``exact_match`` and ``grounding_accuracy`` of generated ``texts`` (one per item; module docstring)."""
    exact, exact_n, grounded, grounded_n = 0, 0, 0, 0
    for item, text in zip(items, texts, strict=True):
        if item.boxes and item.image_size:
            predicted = processor.parse_boxes(text, item.image_size)
            grounded_n += 1
            grounded += int(bool(predicted) and iou(predicted[0].box, item.boxes[0]) >= 0.5)
        else:
            exact_n += 1
            exact += int(normalise(text) == normalise(item.reference or item.answer))
    out: dict[str, float] = {}
    if exact_n:
        out["exact_match"] = exact / exact_n
    if grounded_n:
        out["grounding_accuracy"] = grounded / grounded_n
    return out


@dataclass
class Evaluator:
    """Evaluates a model on fixed validation data (rows encoded once, prompts prepared once)."""

    rows: list[EncodedSample]
    items: list[TaskItem]
    processor: FamilyProcessor
    spec: EvalSpec
    stop_ids: list[int]

    def __call__(self, model: torch.nn.Module, task: bool = True) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            metrics = loss_and_accuracy(model, self.rows, Collator(self.processor.pad_token_id,
                                                                   device=model_device(model)))
            if task and self.spec.task_metrics:
                metrics |= task_metrics(model, self.items, self.processor, self.spec.max_new_tokens, self.stop_ids)
        finally:
            model.train(was_training)
        return metrics


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model's behaviour for the duration (peft models; otherwise a no-op)."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else contextlib.nullcontext():
        yield


def base_and_finetuned(model: torch.nn.Module, evaluator: Evaluator) -> dict[str, float]:
    """``eval/<metric>`` for the fine-tuned model and ``eval_base/<metric>`` for the base model."""
    tuned = evaluator(model)
    with adapter_disabled(model):
        base = evaluator(model)
    return {**{f"eval/{k}": v for k, v in tuned.items()}, **{f"eval_base/{k}": v for k, v in base.items()}}
