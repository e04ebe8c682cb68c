"""Qwen-VL architecture tests on the tiny preset (random init) plus the full preset on the meta device."""

from __future__ import annotations

import warnings

import pytest
import torch

from qwenvl_core.errors import ConfigError, PresetError, QwenVLError
from qwenvl_core.models.qwen_vl import PRESETS, QWenLMHeadModel, QWenVLConfig, build_config

IMG, IMG_END, PAD = 1238, 1239, 1240
N_Q = 16


def span() -> list[int]:
    return [IMG] + [PAD] * N_Q + [IMG_END]


@pytest.fixture(scope="module")
def model() -> QWenLMHeadModel:
    torch.manual_seed(0)
    return QWenLMHeadModel(build_config("qwen-vl-tiny")).eval()


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, 112, generator=gen)


# ----- config / presets -------------------------------------------------------------------------------------
def test_presets_and_validation():
    assert set(PRESETS) == {"qwen-vl", "qwen-vl-chat", "qwen-vl-small", "qwen-vl-tiny", "qwen-vl-tiny-v2",
                            "qwen-vl-tiny-seeing"}
    cfg = build_config("qwen-vl-chat")
    assert (
        cfg.bf16
        and cfg.image_start_id == 151857
        and cfg.image_end_id == 151858
        and cfg.image_pad_id == 151859
    )
    assert (
        cfg.architectures == ["QWenLMHeadModel"] and cfg.model_type == "qwen" and not cfg.tie_word_embeddings
    )
    with pytest.raises(PresetError, match="qwen-vl-tiny"):
        build_config("nope")
    official_visual = {k: v for k, v in cfg.visual.items() if k not in ("n_queries", "pos_grid_size")}
    assert QWenVLConfig(visual=official_visual).visual["n_queries"] == 256
    with pytest.raises(ConfigError, match="visual.n_queries"):
        QWenVLConfig(visual={"n_queries": 10})
    with pytest.raises(ConfigError, match="visual.image_size"):
        QWenVLConfig(visual={"image_size": 450})
    with pytest.raises(ConfigError, match="intermediate_size"):
        QWenVLConfig(intermediate_size=-2)
    with pytest.raises(ConfigError, match="output_dim"):
        QWenVLConfig(hidden_size=2048, num_attention_heads=16)


# ----- full preset on meta ----------------------------------------------------------------------------------
def expected_full_shapes() -> dict[str, tuple[int, ...]]:
    """Official names (reference §1.7) and shapes (§1.2-1.4), written out independently of the model."""
    hid, ffn, vocab, width, vffn, out = 4096, 11008, 151936, 1664, 8192, 4096
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, hid),
        "transformer.ln_f.weight": (hid,),
        "lm_head.weight": (vocab, hid),
    }
    for n in range(32):
        p = f"transformer.h.{n}."
        shapes |= {
            p + "ln_1.weight": (hid,),
            p + "ln_2.weight": (hid,),
            p + "attn.c_attn.weight": (3 * hid, hid),
            p + "attn.c_attn.bias": (3 * hid,),
            p + "attn.c_proj.weight": (hid, hid),
            p + "mlp.w1.weight": (ffn, hid),
            p + "mlp.w2.weight": (ffn, hid),
            p + "mlp.c_proj.weight": (hid, ffn),
        }
    v = "transformer.visual."
    shapes |= {
        v + "conv1.weight": (width, 3, 14, 14),
        v + "positional_embedding": (256, width),
        v + "ln_pre.weight": (width,),
        v + "ln_pre.bias": (width,),
    }
    for m in range(48):
        p = f"{v}transformer.resblocks.{m}."
        shapes |= {
            p + "ln_1.weight": (width,),
            p + "ln_1.bias": (width,),
            p + "ln_2.weight": (width,),
            p + "ln_2.bias": (width,),
            p + "attn.in_proj.weight": (3 * width, width),
            p + "attn.in_proj.bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width),
            p + "attn.out_proj.bias": (width,),
            p + "mlp.c_fc.weight": (vffn, width),
            p + "mlp.c_fc.bias": (vffn,),
            p + "mlp.c_proj.weight": (width, vffn),
            p + "mlp.c_proj.bias": (width,),
        }
    a = v + "attn_pool."
    shapes |= {
        a + "query": (256, out),
        a + "pos_embed": (256, out),
        a + "kv_proj.weight": (out, width),
        a + "attn.in_proj_weight": (3 * out, out),
        a + "attn.in_proj_bias": (3 * out,),
        a + "attn.out_proj.weight": (out, out),
        a + "attn.out_proj.bias": (out,),
        a + "ln_q.weight": (out,),
        a + "ln_q.bias": (out,),
        a + "ln_kv.weight": (out,),
        a + "ln_kv.bias": (out,),
        v + "ln_post.weight": (out,),
        v + "ln_post.bias": (out,),
        v + "proj": (out, out),
    }
    return shapes


def test_full_preset_on_meta_matches_official_names_and_counts():
    with torch.device("meta"):
        full = QWenLMHeadModel(build_config("qwen-vl-chat"))
    state = full.state_dict()
    expected = expected_full_shapes()
    assert len(expected) == 853
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    counts = {"vit": 0, "adapter": 0, "llm": 0}
    for name, param in full.named_parameters():
        if name.startswith("transformer.visual.attn_pool") or name.startswith(
            ("transformer.visual.ln_post", "transformer.visual.proj")
        ):
            counts["adapter"] += param.numel()
        elif name.startswith("transformer.visual."):
            counts["vit"] += param.numel()
        else:
            counts["llm"] += param.numel()
    assert sum(counts.values()) == pytest.approx(9.657e9, rel=0.01)
    assert sum(counts.values()) == pytest.approx(9.6e9, rel=0.01)
    assert counts["vit"] == pytest.approx(1.843e9, rel=0.01)
    assert counts["adapter"] == pytest.approx(0.093e9, rel=0.01)
    assert counts["llm"] == pytest.approx(7.721e9, rel=0.01)
    assert not full.transformer.visual.attn_pool.pos_embed.requires_grad


# ----- forward / backward -----------------------------------------------------------------------------------
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[5, 6] + span() + [7, 8, 9], [10] + span() + [11, 12, 13, 14]])
    labels = ids.clone()
    labels[ids >= IMG] = -100
    return ids, labels


def test_forward_backward_and_adapter_freezing():
    torch.manual_seed(0)
    m = QWenLMHeadModel(build_config("qwen-vl-tiny")).train()
    ids, labels = tiny_batch()
    out = m(input_ids=ids, pixel_values=pixels(2), labels=labels)
    assert out.logits.shape == (2, ids.size(1), 1280) and torch.isfinite(out.loss)
    out.loss.backward()
    pool = m.transformer.visual.attn_pool
    assert pool.query.grad is not None and pool.kv_proj.weight.grad.abs().sum() > 0
    assert pool.pos_embed.grad is None
    assert m.transformer.visual.conv1.weight.grad is not None
    m.zero_grad(set_to_none=True)
    m.transformer.visual.requires_grad_(False)
    m(input_ids=ids, pixel_values=pixels(2), labels=labels).loss.backward()
    assert pool.query.grad is None and pool.kv_proj.weight.grad is None
    assert m.transformer.h[0].attn.c_attn.weight.grad is not None and m.lm_head.weight.grad is not None


def test_loss_only_equals_the_full_loss_and_its_gradients():
    torch.manual_seed(0)
    m = QWenLMHeadModel(build_config("qwen-vl-tiny")).train()
    ids, labels = tiny_batch()
    labels[:, :4] = -100  # some positions unsupervised besides the image spans
    full = m(input_ids=ids, pixel_values=pixels(2), labels=labels)
    full.loss.backward()
    expected = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    lean = m(input_ids=ids, pixel_values=pixels(2), labels=labels, loss_only=True)
    lean.loss.backward()
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss, atol=1e-6, rtol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(m.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(QwenVLError, match="loss_only needs labels"):
        m(input_ids=ids, pixel_values=pixels(2), loss_only=True)


def test_bf16_forward_is_finite(model):
    m16 = QWenLMHeadModel(build_config("qwen-vl-tiny"))
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16).eval()
    ids, labels = tiny_batch()
    out = m16(input_ids=ids, pixel_values=pixels(2), labels=labels)
    assert (
        out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    )


# ----- images -----------------------------------------------------------------------------------------------
def captured_embeddings(m: QWenLMHeadModel, **inputs: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = m.transformer.h[0].register_forward_pre_hook(
        lambda _mod, args: captured.setdefault("x", args[0])
    )
    try:
        with torch.no_grad():
            m(**inputs)
    finally:
        handle.remove()
    return captured["x"]


def test_multi_image_spans_get_their_own_features(model):
    px = pixels(3)
    with torch.no_grad():
        feats = model.transformer.visual(px)  # [3, 16, 64]
    one_row = torch.tensor([[1, 2] + span() + [3] + span() + [4]])
    emb = captured_embeddings(model, input_ids=one_row, pixel_values=px[:2])
    assert torch.allclose(emb[0, 3 : 3 + N_Q], feats[0], atol=1e-5)
    second = 3 + N_Q + 2 + 1
    assert torch.allclose(emb[0, second : second + N_Q], feats[1], atol=1e-5)
    assert torch.equal(emb[0, 0], model.transformer.wte.weight[1])
    two_rows = torch.tensor([[1] + span() + [2], [3] + span() + [4]])
    emb = captured_embeddings(model, input_ids=two_rows, pixel_values=px[1:3])
    assert torch.allclose(emb[0, 2 : 2 + N_Q], feats[1], atol=1e-5)
    assert torch.allclose(emb[1, 2 : 2 + N_Q], feats[2], atol=1e-5)


def test_image_count_mismatch_is_clear_error(model):
    ids = torch.tensor([[1] + span() + [2] + span()])
    with pytest.raises(QwenVLError, match="2 <img> spans.*1 images"):
        model(input_ids=ids, pixel_values=pixels(1))
    with pytest.raises(QwenVLError, match="0 images"):
        model(input_ids=ids)
    with pytest.raises(QwenVLError, match="image count mismatch"):
        model(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=pixels(1))


def test_a_decode_step_reads_nothing_back_from_the_device(model):
    """A one-token forward on the cache (the serving engine's decode step: no images, its mask None where causal
    attention is exact) does not count image spans: on a GPU each count is a read that waits for the device (2
    per step before)."""
    from tests.devices import DeviceRecorder

    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[1] + span() + [2], [2, 3] + span()]), pixel_values=pixels(2),
                      use_cache=True).cache
        recorder = DeviceRecorder("cpu")  # on the CPU it records the ops that would read a device tensor back
        with recorder:
            model(input_ids=torch.tensor([[5], [6]]), past_key_values=cache, use_cache=True)
    assert recorder.reads == []


# ----- KV cache, padding, packing ---------------------------------------------------------------------------
def incremental_logits(
    m: QWenLMHeadModel, ids: torch.Tensor, mask: torch.Tensor, px: torch.Tensor, prefill: int
) -> torch.Tensor:
    with torch.no_grad():
        out = m(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], pixel_values=px, use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(prefill, ids.size(1)):
            out = m(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
            cache = out.cache
    return torch.cat(steps, dim=1)


def test_kv_cache_matches_full_forward_with_left_padding(model):
    row_a = [1, 2] + span() + [3, 4, 5, 6]
    row_b = [0, 0, 0, 7] + span() + [8, 9]
    ids = torch.tensor([row_a, row_b])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    px = pixels(2)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    inc = incremental_logits(model, ids, mask, px, prefill=22)
    assert inc.shape == full.shape
    assert torch.allclose(inc[0], full[0], atol=1e-5)
    assert torch.allclose(inc[1, 3:], full[1, 3:], atol=1e-5)
    with torch.no_grad():
        alone = model(input_ids=ids[1:, 3:], pixel_values=px[1:]).logits
    assert torch.allclose(full[1, 3:], alone[0], atol=1e-5)


def test_kv_cache_without_mask(model):
    ids = torch.tensor([[1] + span() + [2, 3, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels(1)).logits
    assert torch.allclose(incremental_logits(model, ids, mask, pixels(1), prefill=19), full, atol=1e-5)


def test_segment_ids_packing_matches_separate_sequences(model):
    seq_a = [1] + span() + [2, 3]
    seq_b = [4, 5, 6, 7]
    packed = torch.tensor([seq_a + seq_b])
    segments = torch.tensor([[1] * len(seq_a) + [2] * len(seq_b)])
    px = pixels(1)
    with torch.no_grad():
        out = model(input_ids=packed, segment_ids=segments, pixel_values=px).logits
        alone_a = model(input_ids=torch.tensor([seq_a]), pixel_values=px).logits
        alone_b = model(input_ids=torch.tensor([seq_b])).logits
    assert torch.allclose(out[0, : len(seq_a)], alone_a[0], atol=1e-5)
    assert torch.allclose(out[0, len(seq_a) :], alone_b[0], atol=1e-5)


# ----- gradient checkpointing, ntk / logn -------------------------------------------------------------------
def loss_and_grads(m: QWenLMHeadModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, labels = tiny_batch()
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, pixel_values=pixels(2), labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    m = QWenLMHeadModel(build_config("qwen-vl-tiny")).train()
    loss_off, grads_off = loss_and_grads(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in m.transformer.h)
    assert all(block.gradient_checkpointing for block in m.transformer.visual.transformer.resblocks)
    loss_on, grads_on = loss_and_grads(m)
    assert torch.allclose(loss_on, loss_off, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert torch.allclose(grads_on[name], grad, atol=1e-6), name


def test_ntk_and_logn_are_noops_below_seq_length(model):
    ids = torch.tensor([[1] + span() + [2, 3, 4]])
    px = pixels(1)
    with torch.no_grad():
        on = model(input_ids=ids, pixel_values=px).logits
        model.config.use_dynamic_ntk = model.config.use_logn_attn = False
        try:
            off = model(input_ids=ids, pixel_values=px).logits
        finally:
            model.config.use_dynamic_ntk = model.config.use_logn_attn = True
    assert torch.equal(on, off)


def test_ntk_and_logn_change_logits_beyond_seq_length():
    torch.manual_seed(0)
    cfg = build_config("qwen-vl-tiny")
    cfg.seq_length = 8
    m = QWenLMHeadModel(cfg).eval()
    ids = torch.arange(1, 13)[None]
    with torch.no_grad():
        on = m(input_ids=ids).logits
        m.config.use_dynamic_ntk = m.config.use_logn_attn = False
        off = m(input_ids=ids).logits
    assert not torch.allclose(on[:, 8:], off[:, 8:])
