"""QWenLMHeadModel (transformers PreTrainedModel): QWen LM + vision tower, image features spliced into <img> spans.

Owns the model forward contract of docs/architecture.md: image splicing (out-of-place masked_scatter), attention
mask construction (padding + causal + segment ids), default position ids, the KV cache (a per-layer tuple or a transformers ``Cache``), loss. State-dict keys
are exactly the official Qwen-VL names (no buffers are persisted).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.qwen_vl.config import QWenVLConfig
from qwenvl_core.models.qwen_vl.lm import KVPair, QWenBlock, QWenRotary, RMSNorm, logn_scale, ntk_alpha_for
from qwenvl_core.models.qwen_vl.resampler import Resampler
from qwenvl_core.models.qwen_vl.vision import VisionTransformer

PastKV = tuple[KVPair, ...]


class QWenPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, weight init, gradient checkpointing support."""

    config_class = QWenVLConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _tied_weights_keys = None

    def _init_weights(self, module: nn.Module) -> None:
        """Deterministic init (under torch.manual_seed); loaded tensors are skipped by transformers' guards."""
        std = self.config.initializer_range
        if module is getattr(self, "lm_head", None) and self.config.lm_head_init_std is not None:
            std = self.config.lm_head_init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, module.sincos_table())
        elif isinstance(module, VisionTransformer):
            init.normal_(
                module.positional_embedding, mean=0.0, std=module.positional_embedding.size(1) ** -0.5
            )
            init.normal_(module.proj, mean=0.0, std=module.output_dim**-0.5)
        elif isinstance(module, QWenRotary):
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))

    def reset_non_persistent_buffers(self) -> None:
        """Rebuild rotary ``inv_freq`` (float32) on the device of the weights, e.g. after a meta-device build."""
        device = next(self.parameters()).device
        for module in self.modules():
            if isinstance(module, QWenRotary):
                module.reset_inv_freq(device)


def _default_position_ids(
    mask: torch.Tensor, past_len: int, segment_ids: torch.Tensor | None
) -> torch.Tensor:
    """[B, T] positions: cumsum(mask) - 1 clamped at 0; with segment ids, the index within the segment."""
    if segment_ids is None:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # [B, T]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    earlier = torch.ones_like(same).tril() & same & mask[:, None, past_len:].bool()  # [B, T, T]
    return (earlier.long().sum(-1) - 1).clamp(min=0)  # [B, T]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    past_len: int,
    q_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, T_past+T] (True = attend), or None when plain causal attention is exact."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and segment_ids is None and (past_len == 0 or q_len == 1):
        return None
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, Tk]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, Tk]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # [B, 1, T, Tk]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
        mask = mask & same[:, None]  # [B, 1, T, Tk] (no past with segment ids)
    # A query always sees itself, so fully padded rows stay finite (real rows are unchanged).
    return mask | (k_pos == q_pos)[None, None]  # [B, 1, T, Tk]


class QWenModel(QWenPreTrainedModel):
    """Embeddings (+ spliced image features), decoder blocks, final RMSNorm, and the vision tower."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QWenRotary(config.rotary_dim, config.rotary_emb_base)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``wte``."""
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.wte = value

    def splice_images(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Place image k's features at the <imgpad> positions of span k (out of place): embeds [B, T, D].

        A one-token forward without images (a decode step) is not checked: no span fits in it, and counting would
        read the device every step. Its token is embedded as it is, as the official model does after the
        prefill."""
        if pixel_values is None and input_ids.size(1) == 1:
            return embeds
        n_spans, n_pads = torch.stack([(input_ids == self.config.image_start_id).sum(),  # one device read, not two
                                       (input_ids == self.config.image_pad_id).sum()]).tolist()
        n_images = 0 if pixel_values is None else pixel_values.size(0)
        n_queries = self.config.n_queries
        if n_spans != n_images or n_pads != n_images * n_queries:
            raise QwenVLError(
                f"image count mismatch: input_ids hold {n_spans} <img> spans and {n_pads} <imgpad> tokens "
                f"(expected {n_queries} per span) but pixel_values holds {n_images} images"
            )
        if n_images == 0:
            return embeds
        features = self.visual(pixel_values).to(embeds.dtype)  # [N, Q, D]
        pad_mask = (input_ids == self.config.image_pad_id).unsqueeze(-1).expand_as(embeds)  # [B, T, D]
        return embeds.masked_scatter(pad_mask, features.reshape(-1, features.size(-1)))  # [B, T, D]

    def ntk_alphas(
        self,
        total_len: int,
        past_len: int,
        attention_mask: torch.Tensor | None,
        prompt_lengths: torch.Tensor | None,
    ) -> float | list[float]:
        """The dynamic-NTK alpha of each row, fixed by the row's prompt as in the official model.

        The official ``QWenModel.forward`` computes alpha from the length of the prefill (the forward without a
        KV cache) and reuses it for every cached decoding step (``rotary_emb._ntk_alpha_cached``), so the keys in
        the cache and the new ones share one rotary base. Here each row's alpha comes from its own prompt length
        (``prompt_lengths``, else at the prefill its attended length; the later official Qwen code does the
        same with ``true_seq_lens``), so a row never depends on its batch neighbours. Cached and uncached
        decoding agree when the caller passes the same ``prompt_lengths`` (``qwenvl_core.generation`` does).
        """
        if self.training or not self.config.use_dynamic_ntk or total_len <= self.config.seq_length:
            return 1.0  # every prompt is at most total_len long: alpha 1 for all
        if prompt_lengths is None:
            if past_len:
                raise QwenVLError(
                    f"decoding to {total_len} tokens, beyond seq_length {self.config.seq_length}, with a KV cache "
                    "and dynamic NTK needs prompt_lengths (each row's prompt length, which fixes its rotary "
                    "scaling for the whole generation)"
                )
            if attention_mask is None:
                return ntk_alpha_for(total_len, self.config.seq_length)
            prompt_lengths = attention_mask.sum(-1)  # [B]
        return [ntk_alpha_for(int(n), self.config.seq_length) for n in prompt_lengths.tolist()]

    def _rotary_and_scale(
        self, position_ids: torch.Tensor, total_len: int, alphas: float | list[float]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Rotary (cos, sin) with the rows' NTK alphas, and the logn query scale (an exact no-op up to
        seq_length; beyond it log(pos+1)/log(seq_length) per query position, as the official ``logn_tensor``)."""
        rotary = self.rotary_emb(position_ids, ntk_alpha=alphas)
        use_logn = not self.training and total_len > self.config.seq_length and self.config.use_logn_attn
        return rotary, logn_scale(position_ids, self.config.seq_length) if use_logn else None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: PastKV | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool = False,
        segment_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, PastKV | None]:
        """Returns (final hidden states [B, T, D], presents tuple or None)."""
        embeds = self._embed(input_ids, inputs_embeds, pixel_values)  # [B, T, D]
        batch, q_len = embeds.shape[:2]
        cache = past_key_values if hasattr(past_key_values, "update") else None  # a cache object (serving engine)
        if cache is not None:
            past_len = cache.get_seq_length()
        else:
            past_len = past_key_values[0][0].size(2) if past_key_values else 0
        if segment_ids is not None and past_len:
            raise QwenVLError("segment_ids cannot be combined with past_key_values (packing is for training)")
        prepared_mask = attention_mask is not None and attention_mask.dim() == 4
        if prepared_mask and (cache is None or position_ids is None or prompt_lengths is None):
            raise QwenVLError("a 4-D attention_mask (prepared by the serving engine) needs a cache object, "
                              "position_ids and prompt_lengths")
        if not prepared_mask and attention_mask is not None and attention_mask.shape != (batch, past_len + q_len):
            raise QwenVLError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past_len + q_len)} (past + current)"
            )
        if position_ids is None:
            full = attention_mask if attention_mask is not None else embeds.new_ones(batch, past_len + q_len)
            position_ids = _default_position_ids(full, past_len, segment_ids)  # [B, T]
        if prepared_mask:
            mask = attention_mask
            alphas = self.ntk_alphas(past_len + q_len, past_len, None, prompt_lengths)
        else:
            mask = build_attention_mask(attention_mask, segment_ids, past_len, q_len, embeds.device)
            alphas = self.ntk_alphas(past_len + q_len, past_len, attention_mask, prompt_lengths)
        rotary, query_scale = self._rotary_and_scale(position_ids, past_len + q_len, alphas)
        hidden, presents = self.drop(embeds), []
        for i, block in enumerate(self.h):
            if cache is not None:
                layer_past = functools.partial(cache.update, layer_idx=i)
            else:
                layer_past = past_key_values[i] if past_key_values else None
            hidden, present = block(
                hidden,
                rotary=rotary,
                attn_mask=mask,
                query_scale=query_scale,
                layer_past=layer_past,
                use_cache=use_cache,
            )
            presents.append(present)
        if cache is not None:
            out_cache = cache
        else:
            out_cache = tuple(presents) if use_cache and all(p is not None for p in presents) else None
        return self.ln_f(hidden), out_cache

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features spliced in."""
        if (input_ids is None) == (inputs_embeds is None):
            raise QwenVLError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is None:
            if pixel_values is not None:
                raise QwenVLError("pixel_values need input_ids (to find the <img> spans), not inputs_embeds")
            return inputs_embeds
        return self.splice_images(input_ids, self.wte(input_ids), pixel_values)


class QWenLMHeadModel(QWenPreTrainedModel):
    """Qwen-VL causal LM: ``transformer`` (QWenModel) + untied ``lm_head``."""

    def __init__(self, config: QWenVLConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def can_generate(cls) -> bool:
        """False, as transformers already concluded: decoding is ``qwenvl_core.generation.generate`` (and the
        serving engine), not ``GenerationMixin.generate``. Saying so here spares every model load transformers'
        warning about a ``prepare_inputs_for_generation`` without ``GenerationMixin``."""
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``transformer.wte``."""
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        """The output projection ``lm_head``."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the output projection."""
        self.lm_head = value

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: PastKV | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Inputs of one decoding step from the whole sequence so far (peft requires this hook).

        Our own decoding loop is ``qwenvl_core.generation.generate``; this keeps the same rules: after the
        prefill only the last token is fed, images are read only by the prefill, and ``prompt_lengths`` (if the
        caller passes it) fixes the dynamic-NTK alpha of each row.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        if past_key_values:
            input_ids, position_ids, pixel_values = input_ids[:, -1:], position_ids[:, -1:], None
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "pixel_values": pixel_values,
            "use_cache": True,
            "prompt_lengths": kwargs.get("prompt_lengths"),
        }

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: PastKV | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        segment_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        loss_only: bool = False,
        prompt_lengths: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """See docs/architecture.md "Model forward contract"; unknown kwargs (from peft / Trainer) are ignored.

        ``prompt_lengths`` [B] (generation): each row's prompt length, which fixes the row's dynamic-NTK alpha for
        the whole generation as the official model does (``QWenModel.ntk_alphas``); needed only for decoding
        beyond ``seq_length``.

        ``logits_to_keep`` (generation): when > 0, the LM head runs on the last that many positions only.

        ``past_key_values`` may be a cache object with transformers' ``update(key, value, layer_idx)`` /
        ``get_seq_length()`` (the serving engine's ``SlotKVCache``); then ``attention_mask`` may be the engine's
        prepared 4-D boolean mask ``[B, 1, T, Tk]`` (with ``position_ids`` and ``prompt_lengths``).

        ``loss_only`` (training, with ``labels``): the LM head runs only where the next token is supervised and
        no logits are returned; the loss equals the full one (in VL data most positions are image and prompt
        tokens, and at full size the head is 10% of the compute and [B, T, 151,936] fp32 logits of memory).

        transformers 5.24 renamed the output field to ``cache``; ``output.past_key_values`` still reads it (it logs
        a one-time deprecation notice). A ``cache=`` keyword is accepted as an alias of ``past_key_values``.
        """
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        hidden, presents = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            pixel_values=pixel_values,
            use_cache=use_cache,
            segment_ids=segment_ids,
            inputs_embeds=inputs_embeds,
            prompt_lengths=prompt_lengths,
        )
        if loss_only:
            if labels is None:
                raise QwenVLError("loss_only needs labels")
            return CausalLMOutputWithPast(loss=supervised_lm_loss(hidden, labels, self.lm_head), cache=presents)
        if logits_to_keep and labels is not None:
            raise QwenVLError("logits_to_keep is for generation; a loss needs every position's logits")
        if logits_to_keep:  # only the last positions' logits (a prefill needs the last one), as transformers does
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [B, T or logits_to_keep, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=presents)


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """``causal_lm_loss`` with the head applied only to hidden states [B, T, D] whose next label is not -100."""
    targets = labels[:, 1:].to(hidden.device)  # [B, T-1]
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring -100."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # [B*(T-1)]
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
