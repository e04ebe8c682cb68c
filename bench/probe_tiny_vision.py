"""Where does the tiny Qwen-VL lose what the picture shows? Linear probes on every stage, and the experiments
that find the cause (docs/pretraining.md has the numbers and what they mean).

1. Probe table: single shapes (8 kinds, 7 colours, random size and place), each asked "What is in the picture?";
   a held-out logistic-regression probe per stage (``qwenvl_core.pretrain.probe``) for shape (chance 1/8), colour
   (the control, 1/7) and region (3 x 3 cells); ``image share`` is how much of the stage's features depends on
   the image at all.
2. Tower diagnostics: how much each ViT block changes its input, the adapter's attention entropy (1.0 = a
   uniform average over the patches), how alike the adapter's output tokens are, positions vs patch content.
3. ``--experiments``: the vision tower trained alone with a linear readout (no LM) for shape and region, at the
   preset's init and with the recipe's changes (init std 0.1, positional embedding std 1), pooled over tokens
   as an LM attending uniformly sees them; and the LM's attention mass on the image tokens at the answer.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/probe_tiny_vision.py [--model DIR] [--experiments]
(default model: qwen-vl-tiny materialised with seed 0, as the local stack does)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def load(model_dir: Path | None, root: Path) -> tuple[object, object, str]:
    from qwenvl_core.models.qwen_vl.materialize import write_random_model
    from qwenvl_core.models.registry import detect_family

    if model_dir is None:
        model_dir = write_random_model(root / "qwen-vl-tiny", preset="qwen-vl-tiny", seed=0)
        name = "qwen-vl-tiny, random (seed 0)"
    else:
        name = str(model_dir)
    family = detect_family(model_dir)
    return family.load_model(model_dir), family.load_processor(model_dir), name


def probe_table(model: object, processor: object, n: int, n_train: int) -> None:
    import torch

    from qwenvl_core.pretrain import probe
    from qwenvl_core.pretrain.render import Scene
    from qwenvl_core.pretrain.vision_warmup import LABELS, labels, single_things

    things = single_things(n, "probe")
    feats = probe.capture(model, processor, [Scene((t,)).image(processor.image_size) for t in things])
    targets = {k: (y, len(LABELS[k])) for k, y in labels(things).items()}
    print(f"{'stage':20s} {'shape':>6s} {'shape*':>6s} {'colour':>6s} {'region':>6s} {'image share':>11s}")
    for stage, x in feats.items():
        accs = []
        for key, pool in (("shape", False), ("shape", True), ("colour", False), ("region", False)):
            y, classes = targets[key]
            flat = (x.mean(1) if pool and x.dim() == 3 else x).flatten(1)
            accs.append(probe.fit_probe(flat[:n_train], y[:n_train], flat[n_train:], y[n_train:], classes)
                        if not (pool and x.dim() != 3) else float("nan"))
        print(f"{stage:20s} " + " ".join(f"{a:6.3f}" for a in accs) + f" {probe.image_share(x):11.2e}")
    print("(shape* = features averaged over tokens first; chance: shape 0.125, colour 0.143, region ~0.11-0.2)")
    d = probe.tower_diagnostics(model, feats)
    torch.set_printoptions(precision=3)
    print(f"ViT blocks change their input by {[round(u, 3) for u in d.block_updates]} (relative norm)")
    print(f"adapter attention entropy / log(patches): {d.attention_entropy:.3f} (1.0 = uniform average)")
    print(f"cosine similarity between one image's adapter output tokens: {d.query_similarity:.3f}")
    print(f"positional embedding / patch embedding norm: {d.position_share:.3f}")


def experiments(image_steps: int) -> None:
    from qwenvl_core.models.qwen_vl.presets import build_config
    from qwenvl_core.pretrain.vision_warmup import warm_up_vision

    print(f"\nvision tower alone + linear readout of shape / region, {image_steps} steps of 32 (held-out accuracy):")
    for preset, pos_std in (("qwen-vl-tiny", None), ("qwen-vl-tiny-v2", None), ("qwen-vl-tiny-v2", 1.0)):
        config = build_config(preset)
        for pooled in (False, True):
            start = time.monotonic()
            acc = warm_up_vision(_fresh(preset, pos_std), config.visual["image_size"], image_steps,
                                 pooled=pooled, targets=("shape", "region"))
            print(f"  {preset:16s} init std {config.initializer_range:<5} positions std "
                  f"{pos_std if pos_std else 'width**-0.5':<11} {'pooled' if pooled else 'per-token':9s} "
                  f"shape {acc['shape']:.3f} region {acc['region']:.3f} ({time.monotonic() - start:.0f} s)")


def _fresh(preset: str, pos_std: float | None) -> object:
    import torch

    from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel
    from qwenvl_core.models.qwen_vl.presets import build_config

    torch.manual_seed(0)
    visual = QWenLMHeadModel(build_config(preset)).transformer.visual
    if pos_std is not None:
        with torch.no_grad():
            visual.positional_embedding.normal_(0.0, pos_std)
    return visual


def attention_at_answer(model: object, processor: object) -> None:
    from qwenvl_core.data import Collator, encode_sample
    from qwenvl_core.pretrain.probe import image_attention_share
    from qwenvl_core.pretrain.render import mixture

    rows = [encode_sample(s, processor) for s in mixture(("region", "shape"), 7, 0, 32)]
    # The answer starts after "<|im_start|>assistant\n": its first token is predicted at the last prompt token.
    offsets = []
    for row in rows:
        first = next(i for i in range(1, len(row.labels)) if row.labels[i] != -100 and row.labels[i - 1] == -100
                     and i > len(row.labels) - 12)
        offsets.append(first - 1)
    batch = Collator(processor.tokenizer.eod_id)(rows)
    shares = image_attention_share(model, batch, processor.tokenizer.img_pad_id, offsets)
    n_image = int((batch["input_ids"][0] == processor.tokenizer.img_pad_id).sum())
    n_tokens = int(batch["attention_mask"][0].sum())
    print(f"\nLM attention mass on the {n_image} image tokens (of ~{n_tokens}) from the answer position, per layer: "
          f"{[round(s, 3) for s in shares]} (uniform would be {n_image / n_tokens:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: random qwen-vl-tiny)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--train", type=int, default=600, help="probe training samples (the rest are held out)")
    parser.add_argument("--experiments", action="store_true", help="also run the targeted experiments")
    parser.add_argument("--readout-steps", type=int, default=600)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        model, processor, name = load(args.model, Path(tmp))
        print(f"model: {name}")
        probe_table(model, processor, args.samples, args.train)
        attention_at_answer(model, processor)
        if args.experiments:
            experiments(args.readout_steps)
        print(f"\n{time.monotonic() - start:.0f} s on 1 thread")


if __name__ == "__main__":
    main()
