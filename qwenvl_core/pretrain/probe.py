"""Linear probes on every stage of a Qwen-VL model: what each stage's features still say about the picture.

This module owns capturing the features of each stage of one model for a batch of single-image questions
(forward hooks only: the model's own forward runs, nothing is re-implemented) and fitting a held-out logistic
regression probe on them. Stages, in order: pooled raw pixels, conv1 patch embeddings, + positions and ln_pre,
each ViT block, the adapter (Resampler) output, ln_post, the final proj (what the LM receives), then every LM
layer's hidden states at the image positions and at the answer position (the last prompt token).

Besides accuracy, ``image_share`` says how much of a stage's features depends on the image at all: the spread
across images relative to the features' size. A probe standardises its inputs, so it still finds a signal that
is 1e-4 of the features; a language model fed those features, and the gradients it sends back, may not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor

PROBE_QUESTION = "What is in the picture?"  # neutral: the text never names the answer


@dataclass(frozen=True)
class ProbeResult:
    stage: str
    accuracy: float
    image_share: float


def _hook(store: dict[str, list[torch.Tensor]], name: str) -> Callable[..., None]:
    def record(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        store.setdefault(name, []).append(tensor.detach().float())
    return record


def _stage_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    visual = model.transformer.visual
    stages = [("conv1", visual.conv1), ("ln_pre", visual.ln_pre)]
    stages += [(f"vit_block{i}", b) for i, b in enumerate(visual.transformer.resblocks)]
    stages += [("resampler", visual.attn_pool), ("ln_post", visual.ln_post), ("proj", visual)]
    stages += [(f"lm_layer{i}", b) for i, b in enumerate(model.transformer.h)]
    return stages


@torch.no_grad()
def capture(model: torch.nn.Module, processor: QwenVLProcessor, images: Sequence[object], batch: int = 32
            ) -> dict[str, torch.Tensor]:
    """Features [N, ...] of every stage for ``images`` (PIL images), each asked ``PROBE_QUESTION``."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(_hook(store, name)) for name, m in _stage_modules(model)]
    handles.append(model.transformer.h[0].register_forward_pre_hook(
        lambda _m, args: store.setdefault("lm_input", []).append(args[0].detach().float())))
    pooled, pad_masks = [], []
    try:
        for start in range(0, len(images), batch):
            prompts = [processor.encode_chat([Message("user", [ImagePart(img), TextPart(PROBE_QUESTION)])])
                       for img in images[start:start + batch]]
            ids = torch.tensor([p.input_ids for p in prompts])  # same length: one image, same text
            pixels = torch.cat([p.pixel_values for p in prompts])  # [B, 3, S, S]
            pooled.append(F.adaptive_avg_pool2d(pixels, 8).flatten(1))  # [B, 3*8*8]
            pad_masks.append(ids == processor.tokenizer.img_pad_id)
            model(input_ids=ids, pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
    feats = {"pixels": torch.cat(pooled)}
    mask = torch.cat(pad_masks)  # [N, T]
    n = mask.size(0)
    for name, parts in store.items():
        x = torch.cat(parts)
        if name == "conv1":
            feats[name] = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        elif name.startswith("lm_"):
            feats[f"{name}@image"] = x[mask].view(n, -1, x.size(-1))  # [N, Q, D]
            feats[f"{name}@answer"] = x[:, -1]  # [N, D]
        else:
            feats[name] = x
    return feats


def image_share(x: torch.Tensor) -> float:
    """RMS over features of the across-image std, divided by the RMS of the features themselves."""
    flat = x.flatten(1)
    return float(flat.std(0).pow(2).mean().sqrt() / flat.pow(2).mean().sqrt().clamp_min(1e-30))


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              n_classes: int, l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1)) -> float:
    """Held-out accuracy of an L2 logistic regression on standardised features (L2 picked on a split of train)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-12)
    tr, te = (train_x - mean) / std, (test_x - mean) / std
    cut = int(0.8 * len(tr))
    best = max(l2_grid, key=lambda l2: _accuracy(_train(tr[:cut], train_y[:cut], n_classes, l2), tr[cut:],
                                                  train_y[cut:]))
    return _accuracy(_train(tr, train_y, n_classes, best), te, test_y)


def _train(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(x.size(1), n_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


@torch.no_grad()
def _accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((layer(x).argmax(-1) == y).float().mean())


def probe_stages(feats: dict[str, torch.Tensor], labels: torch.Tensor, n_train: int, n_classes: int,
                 pool: bool = False) -> list[ProbeResult]:
    """One probe per stage (features flattened; ``pool``: token stages averaged over tokens instead)."""
    results = []
    for stage, x in feats.items():
        flat = (x.mean(1) if pool and x.dim() == 3 else x).flatten(1)
        acc = fit_probe(flat[:n_train], labels[:n_train], flat[n_train:], labels[n_train:], n_classes)
        results.append(ProbeResult(stage, acc, image_share(x)))
    return results


@dataclass(frozen=True)
class TowerDiagnostics:
    """How much each ViT block changes its input, and how the adapter attends."""

    block_updates: list[float]  # ||block(x) - x|| / ||x|| per ViT block
    attention_entropy: float  # adapter attention entropy / log(patches): 1.0 = a uniform average
    query_similarity: float  # mean cosine similarity between the adapter's output tokens of one image
    position_share: float  # ||positional embedding|| / ||conv1 patch embedding|| (before ln_pre)


@torch.no_grad()
def tower_diagnostics(model: torch.nn.Module, feats: dict[str, torch.Tensor]) -> TowerDiagnostics:
    """Diagnostics from captured features (``capture``) and the tower's own modules."""
    from qwenvl_core.models.qwen_vl.resampler import get_abs_pos

    visual = model.transformer.visual
    x, updates = feats["ln_pre"], []
    for block in visual.transformer.resblocks:
        out = block(x)
        updates.append(float((out - x).norm() / x.norm()))
        x = out
    pool = visual.attn_pool
    kv = pool.ln_kv(pool.kv_proj(x))  # [N, L, D]
    pos_k = get_abs_pos(pool.pos_embed, x.size(1))  # [L, D]
    q = (pool.ln_q(pool.query) + pool.pos_embed).unsqueeze(0).expand(x.size(0), -1, -1)  # [N, Q, D]
    _, weights = pool.attn(q, kv + pos_k, kv, need_weights=True)  # [N, Q, L]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean() / math.log(x.size(1))
    tokens = F.normalize(feats["resampler"], dim=-1)  # [N, Q, D]
    similarity = (tokens @ tokens.transpose(1, 2)).mean()
    pos = get_abs_pos(visual.positional_embedding, x.size(1)).float()
    return TowerDiagnostics(updates, float(entropy), float(similarity),
                            float(pos.norm(dim=-1).mean() / feats["conv1"].norm(dim=-1).mean()))


@torch.no_grad()
def image_attention_share(model: torch.nn.Module, batch: dict[str, torch.Tensor], image_pad_id: int,
                          answer_offsets: Sequence[int]) -> list[float]:
    """Per LM layer: the attention mass (mean over heads and rows) that the position predicting the answer's
    first token (``answer_offsets[i]``) puts on the row's image tokens. The weights are recomputed from each
    attention module's own inputs and projections (a pre-forward hook), causal as in training."""
    from qwenvl_core.models.qwen_vl.lm import apply_rotary

    shares: list[float] = []
    image = (batch["input_ids"] == image_pad_id).float()  # [B, T]
    rows, offsets = torch.arange(image.size(0)), torch.tensor(list(answer_offsets))

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, (cos, sin) = args[0], args[1]
        q, k, _ = (module._split(t) for t in module.c_attn(hidden).chunk(3, dim=-1))  # [B, H, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) * module.scale  # [B, H, T, T]
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        mask = causal if kwargs.get("attn_mask") is None else kwargs["attn_mask"]
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        shares.append(float((weights[rows, :, offsets] * image[:, None]).sum(-1).mean()))

    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in model.transformer.h]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch.get("pixel_values"))
    finally:
        for handle in handles:
            handle.remove()
    return shares
