"""The platform's model forward contract on transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL models.

The trainer, evaluation and ``qwenvl_core.generation`` call a model as ``docs/architecture.md`` ("Model forward
contract") says: ``model(input_ids, attention_mask, labels, loss_only=True, **vision)`` in training,
``model(**batch).logits`` in evaluation, ``model(input_ids, attention_mask, position_ids [B, T], past_key_values,
prompt_lengths, **vision)`` in generation. transformers' ``*ForConditionalGeneration.forward`` differs in four
ways, and ``install_forward_contract(model)`` bridges them on the model instance, in this one place:

- ``mm_token_type_ids`` ``[B, T]`` (0 text, 1 image, 2 video), which the 5.x models require whenever
  ``image_grid_thw`` is passed (M-RoPE positions are computed from it), is derived from ``input_ids`` when the
  caller does not pass it, exactly as transformers' processor does (``ProcessorMixin.create_mm_token_type_ids``:
  the config's ``image_token_id`` -> 1, ``video_token_id`` -> 2, everything else 0);
- ``loss_only=True`` (with ``labels``): the LM head runs only at positions whose next token is supervised
  (``supervised_lm_loss``, shared with v1); the loss equals transformers' own ``model(..., labels=).loss``
  (mean cross-entropy over supervised next tokens) and no logits are returned;
- ``position_ids`` ``[B, T]`` (the contract's text positions ``cumsum(attention_mask) - 1``, left padding not
  shifting them) become M-RoPE positions ``[3, B, T]``: at a prefill (empty or no cache) with images from
  transformers' ``get_rope_index`` (per row, padding skipped) and without images the text positions on all three
  axes; the per-row offset between the two (``rope_deltas``, ``[B, 1]``) is kept where transformers keeps it
  (``model.model.rope_deltas``) and added to the text positions of every later cached step, as transformers'
  ``generate`` does. Positions already ``[3|4, B, T]`` pass through; without ``position_ids`` transformers
  computes them (training and evaluation forwards, right padding);
- ``segment_ids`` (packed rows) are refused (``PACKING_REFUSAL``): transformers builds per-sample masks of packed
  rows only from ``[4, B, T]`` positions without an attention mask, and the platform does not compute M-RoPE per
  packed sample; ``prompt_lengths`` is dropped (these models have no length-dependent rotary scaling).

The class, its parameter names and ``save_pretrained`` are unchanged (the forward is an instance attribute, so
``nn.Module.__call__``, its hooks, DDP and DeepSpeed still wrap it; peft passes the extra keywords through).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwenvl_core.errors import QwenVLError

INSTALLED_ATTR = "_qwenvl_forward_contract"
PACKING_REFUSAL = (
    "packed sequences are not supported for this family: its multimodal rotary positions (M-RoPE) depend on "
    "each sample's images and text and are not computed per packed sample; set hyperparameters.packing to false"
)


def token_types(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """``mm_token_type_ids`` of ``input_ids`` as transformers' processor builds it: image pad 1, video pad 2, else 0."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def install_forward_contract(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s forward follow the platform's contract (module docstring); idempotent; returns ``model``."""
    if not getattr(model, INSTALLED_ATTR, False):
        model.forward = functools.partial(_contract_forward, model, model.forward)
        setattr(model, INSTALLED_ATTR, True)
    return model


def _contract_forward(
    model: Any,
    original: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    labels: torch.Tensor | None = None,
    *,
    loss_only: bool = False,
    segment_ids: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    del prompt_lengths  # no length-dependent rotary scaling in these models
    if segment_ids is not None:
        raise QwenVLError(PACKING_REFUSAL)
    cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
    if input_ids is not None and mm_token_type_ids is None:
        mm_token_type_ids = token_types(input_ids, model.config)
    if position_ids is not None and position_ids.dim() == 2:
        position_ids = _mrope_positions(model.model, input_ids, position_ids, mm_token_type_ids, attention_mask,
                                        cache, kwargs)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "cache": cache, "mm_token_type_ids": mm_token_type_ids, **kwargs}
    if not loss_only:
        return original(labels=labels, **inputs)
    if labels is None:
        raise QwenVLError("loss_only needs labels")
    from qwenvl_core.models.qwen_vl.modeling import supervised_lm_loss

    inputs.pop("logits_to_keep", None)
    out = model.model(**inputs)
    return CausalLMOutputWithPast(loss=supervised_lm_loss(out.last_hidden_state, labels, model.lm_head),
                                  cache=out.cache)


def _mrope_positions(inner: Any, input_ids: torch.Tensor | None, text_positions: torch.Tensor,
                     types: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: Any,
                     kwargs: dict[str, Any]) -> torch.Tensor:
    """``[3, B, T]`` M-RoPE positions from the contract's text positions ``[B, T]`` (module docstring)."""
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        positions, deltas = prefill_positions(inner, input_ids, text_positions, types, attention_mask, kwargs)
        inner.rope_deltas = deltas
        return positions
    deltas = inner.rope_deltas
    if deltas is None or deltas.shape[0] != text_positions.shape[0]:
        deltas = torch.zeros(text_positions.shape[0], 1, dtype=torch.long, device=text_positions.device)
    return step_positions(text_positions, deltas)


def prefill_positions(inner: Any, input_ids: torch.Tensor | None, text_positions: torch.Tensor,
                      types: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      vision: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions ``[3, B, T]`` of a prefill and each row's offset ``[B, 1]`` (later text position + offset
    is the row's position): transformers' ``get_rope_index`` when there are images, else the text positions."""
    grids = {k: vision[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if vision.get(k) is not None}
    if input_ids is not None and ("image_grid_thw" in grids or "video_grid_thw" in grids):
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
        return inner.get_rope_index(input_ids, mm_token_type_ids=types, attention_mask=mask, **grids)
    deltas = torch.zeros(text_positions.shape[0], 1, dtype=torch.long, device=text_positions.device)
    return text_positions.unsqueeze(0).expand(3, -1, -1), deltas


def step_positions(text_positions: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions ``[3, B, T]`` of cached steps: the text positions ``[B, T]`` plus each row's offset."""
    return (text_positions + deltas.to(text_positions.device)).unsqueeze(0).expand(3, -1, -1)
