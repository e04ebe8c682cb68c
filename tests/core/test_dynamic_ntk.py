"""Dynamic NTK and logn while decoding across ``seq_length``: our model against the official semantics.

The official ``modeling_qwen.py`` (Qwen-VL) computes the NTK alpha from the length of the prefill (the forward
without a KV cache) and keeps it (``rotary_emb._ntk_alpha_cached``) for every cached decoding step; logn scales
each query by log(pos+1)/log(seq_length) beyond seq_length. ``official_greedy`` below is an independent
transcription of that code path (RMSNorm, fused QKV, rotary cache, logn, causal attention, SwiGLU), run on our
model's weights; our cached and uncached generation must reproduce its logits and tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.models.qwen_vl import QWenLMHeadModel, build_config

SEQ_LENGTH = 16


@pytest.fixture(scope="module")
def model() -> QWenLMHeadModel:
    torch.manual_seed(0)
    cfg = build_config("qwen-vl-tiny")
    cfg.seq_length = SEQ_LENGTH
    assert cfg.use_dynamic_ntk and cfg.use_logn_attn
    return QWenLMHeadModel(cfg).eval()


# ----- independent transcription of the official forward (text only) ----------------------------------------
class OfficialRotary:
    """modeling_qwen.RotaryEmbedding: a cos/sin cache rebuilt when the length grows or alpha changes."""

    def __init__(self, dim: int, base: float) -> None:
        self.dim, self.base = dim, base
        self.seq_len_cached, self.ntk_alpha_cached = 0, 1.0
        self.cos = self.sin = torch.empty(0)

    def __call__(self, max_seq_len: int, ntk_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        if max_seq_len > self.seq_len_cached or ntk_alpha != self.ntk_alpha_cached:
            base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))
            self.seq_len_cached, self.ntk_alpha_cached = max(2 * max_seq_len, 16), ntk_alpha
            freqs = torch.outer(torch.arange(self.seq_len_cached).type_as(inv_freq), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        return self.cos[:, :max_seq_len], self.sin[:, :max_seq_len]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t1, t2 = t.float().chunk(2, dim=-1)
    return (t.float() * cos + torch.cat((-t2, t1), dim=-1) * sin).type_as(t)


class OfficialLM:
    """QWenModel + lm_head of the official remote code, eval mode, no flash attention, batch of one."""

    def __init__(self, m: QWenLMHeadModel) -> None:
        self.m, self.cfg = m, m.config
        self.rotary = OfficialRotary(self.cfg.kv_channels, self.cfg.rotary_emb_base)
        self.logn = torch.tensor(
            [math.log(i, self.cfg.seq_length) if i > self.cfg.seq_length else 1 for i in range(1, 4096)]
        )[None, :, None, None]

    @torch.no_grad()
    def forward(self, ids: list[int], past: list | None) -> tuple[torch.Tensor, list]:
        cfg, tr = self.cfg, self.m.transformer
        hidden = tr.wte(torch.tensor([ids]))
        kv_seq_len = hidden.size(1) + (past[0][0].size(1) if past else 0)
        if cfg.use_dynamic_ntk and kv_seq_len == hidden.size(1):
            context_value = math.log(kv_seq_len / cfg.seq_length, 2) + 1
            ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)
        else:
            ntk_alpha = self.rotary.ntk_alpha_cached
        cos, sin = self.rotary(kv_seq_len, ntk_alpha)
        presents = []
        for i, block in enumerate(tr.h):
            x = _rms(hidden, block.ln_1.weight, cfg.layer_norm_epsilon)
            q, k, v = block.attn.c_attn(x).split(cfg.hidden_size, dim=2)
            q, k, v = (t.view(1, t.size(1), cfg.num_attention_heads, cfg.kv_channels) for t in (q, k, v))
            cur = q.size(1)
            q, k = _rotate(q, cos[:, -cur:], sin[:, -cur:]), _rotate(k, cos[:, -cur:], sin[:, -cur:])
            if past:
                k, v = torch.cat((past[i][0], k), dim=1), torch.cat((past[i][1], v), dim=1)
            presents.append((k, v))
            if cfg.use_logn_attn:
                q = q * self.logn[:, k.size(1) - q.size(1) : k.size(1)].expand_as(q)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            w = torch.matmul(q, k.transpose(-1, -2)) / v.size(-1) ** 0.5
            q_len, k_len = q.size(-2), k.size(-2)
            causal = torch.tril(torch.ones(k_len, k_len, dtype=torch.bool))[k_len - q_len : k_len]
            w = F.softmax(torch.where(causal, w, torch.finfo(w.dtype).min), dim=-1)
            attn = torch.matmul(w, v).transpose(1, 2).reshape(1, q_len, -1)
            hidden = hidden + block.attn.c_proj(attn)
            x = _rms(hidden, block.ln_2.weight, cfg.layer_norm_epsilon)
            hidden = hidden + block.mlp.c_proj(block.mlp.w1(x) * F.silu(block.mlp.w2(x)))
        logits = self.m.lm_head(_rms(hidden, tr.ln_f.weight, cfg.layer_norm_epsilon))
        return logits[0, -1], presents


def official_greedy(m: QWenLMHeadModel, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Official cached greedy decoding: (tokens, logits [steps, V] of every step)."""
    lm = OfficialLM(m)
    logits, past = lm.forward(prompt, None)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        logits, past = lm.forward([tokens[-1]], past)
    return tokens, torch.stack(all_logits)


# ----- tests --------------------------------------------------------------------------------------------------
def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def our_cached_logits(m: QWenLMHeadModel, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Our model teacher-forced on ``tokens`` with a KV cache, as ``generate`` calls it: logits [steps, V]."""
    lengths = torch.tensor([len(prompt)])
    out = m(input_ids=torch.tensor([prompt]), use_cache=True, prompt_lengths=lengths)
    logits, past = [out.logits[0, -1]], out.cache
    for step, token in enumerate(tokens[:-1]):
        pos = torch.tensor([[len(prompt) + step]])
        out = m(input_ids=torch.tensor([[token]]), position_ids=pos, past_key_values=past, use_cache=True,
                prompt_lengths=lengths)
        logits.append(out.logits[0, -1])
        past = out.cache
    return torch.stack(logits)


@pytest.mark.parametrize(("prompt_len", "steps"), [(10, 16), (20, 16)])
def test_cached_decoding_across_seq_length_matches_the_official_model(model, prompt_len, steps):
    # (10, 16): alpha 1 from the prompt, kept after position 16; (20, 16): alpha 3, kept after position 32.
    prompt = _prompt(prompt_len, prompt_len)
    tokens, official = official_greedy(model, prompt, steps)
    torch.testing.assert_close(our_cached_logits(model, prompt, tokens), official, atol=1e-5, rtol=1e-5)
    out = generate(model, [prompt], pad_token_id=0, params=SamplingParams(max_new_tokens=steps))[0]
    assert out.token_ids == tokens


def test_recomputing_alpha_while_decoding_would_be_caught(model):
    """The check above can fail: alpha re-derived from the total length gives other logits past seq_length."""
    prompt = _prompt(10, 10)
    tokens, official = official_greedy(model, prompt, 16)
    lengths_now = [10 + s for s in range(16)]  # total length at each step: what the old code used
    with torch.no_grad():
        drifting = torch.stack([
            model(input_ids=torch.tensor([prompt + tokens[:s]]), prompt_lengths=torch.tensor([n])).logits[0, -1]
            for s, n in enumerate(lengths_now)
        ])
    assert torch.allclose(drifting[:7], official[:7], atol=1e-5)  # up to 16 tokens: alpha 1 either way
    assert not torch.allclose(drifting[7:], official[7:], atol=1e-3)


def test_batched_cached_and_uncached_generation_agree_beyond_seq_length(model):
    """Left-padded rows of one batch, with and without the KV cache: each row's logits at every step are the
    official model's for that row alone (its alpha comes from its own prompt)."""
    prompts = [_prompt(10, 1), _prompt(20, 2), _prompt(5, 3)]
    official = [official_greedy(model, p, 14) for p in prompts]
    for use_cache in (True, False):
        seen: list[torch.Tensor] = []

        def recording(seen=seen, **inputs):
            out = model(**inputs)
            seen.append(out.logits[:, -1])
            return out

        outs = generate(recording, prompts, pad_token_id=0, params=SamplingParams(max_new_tokens=14),
                        use_cache=use_cache)
        assert [o.token_ids for o in outs] == [tokens for tokens, _ in official], f"use_cache={use_cache}"
        for row, (_, logits) in enumerate(official):
            torch.testing.assert_close(torch.stack([s[row] for s in seen]), logits, atol=1e-5, rtol=1e-5)


def test_decoding_beyond_seq_length_without_prompt_lengths_is_a_clear_error(model):
    prompt = _prompt(16, 4)
    with torch.no_grad():
        past = model(input_ids=torch.tensor([prompt]), use_cache=True).cache
        with pytest.raises(QwenVLError, match="prompt_lengths"):
            model(input_ids=torch.tensor([[5]]), past_key_values=past, use_cache=True)
