"""Forward+backward throughput of Qwen-VL presets, beside the machine's measured matmul peak (MFU).

For each preset and dtype: a batch of sequences, each with one image span, is run forward and backward
(all parameters trainable, fp32 or bf16 weights). Model FLOPs per step are counted exactly with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward); the peak is
the best square-matmul FLOP/s measured in the same run, in the same dtype. MFU = achieved / peak.

Usage (CPU, the numbers in docs/benchmarks.md):
    .venv/bin/python bench/model_throughput.py
GPU (full size, random weights, 448 px, 512 tokens, bf16):
    .venv/bin/python bench/model_throughput.py --device cuda --presets qwen-vl-chat --dtypes bfloat16 \
        --batch 1 --seq-len 512 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel
from qwenvl_core.models.qwen_vl.presets import build_config


@dataclass
class Result:
    preset: str
    dtype: str
    device: str
    batch: int
    seq_len: int
    params: int
    step_s: float
    tokens_per_s: float
    tflops_achieved: float
    tflops_peak: float
    mfu: float
    peak_mem_gib: float | None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_flops(dtype: torch.dtype, device: str, sizes: tuple[int, ...] = (1024, 2048, 4096)) -> float:
    """Best observed FLOP/s of square matmuls in ``dtype`` on ``device`` (several sizes, after warm-up)."""
    best_rate = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b)
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - start))
    return best_rate


def make_batch(config, batch: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    """Token ids with one image span per row at a fixed offset, random pixels, labels = ids."""
    n_q = config.n_queries
    span = [config.image_start_id] + [config.image_pad_id] * n_q + [config.image_end_id]
    if seq_len < len(span) + 8:
        raise SystemExit(f"--seq-len must be at least {len(span) + 8} for this preset")
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(1000, config.vocab_size), (batch, seq_len - len(span)), generator=gen)
    ids = torch.cat([text[:, :4], torch.tensor(span).expand(batch, -1), text[:, 4:]], dim=1)
    size = config.visual["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.to(device), "pixel_values": pixels.to(device)}


def step(model: QWenLMHeadModel, batch: dict[str, torch.Tensor]) -> None:
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(preset: str, dtype: torch.dtype, device: str, batch_size: int, seq_len: int, steps: int) -> Result:
    config = build_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = QWenLMHeadModel(config).to(dtype)
    model.train()
    batch = make_batch(config, batch_size, seq_len, device)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with FlopCounterMode(display=False) as counter:
        step(model, batch)
    flops = counter.get_total_flops()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step(model, batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    peak = matmul_peak_flops(dtype, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return Result(
        preset=preset, dtype=str(dtype).removeprefix("torch."), device=device, batch=batch_size,
        seq_len=seq_len, params=sum(p.numel() for p in model.parameters()), step_s=step_s,
        tokens_per_s=batch_size * seq_len / step_s, tflops_achieved=flops / step_s / 1e12,
        tflops_peak=peak / 1e12, mfu=flops / step_s / peak, peak_mem_gib=mem,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["qwen-vl-tiny", "qwen-vl-small"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'preset':<14} {'dtype':<9} {'params':>12} {'step s':>8} {'tokens/s':>10} "
          f"{'TFLOP/s':>8} {'peak':>8} {'MFU':>6} {'mem GiB':>8}")
    for preset in args.presets:
        for dtype_name in args.dtypes:
            r = measure(preset, getattr(torch, dtype_name), args.device, args.batch, args.seq_len, args.steps)
            if args.json:
                print(json.dumps(asdict(r)))
                continue
            mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
            print(f"{r.preset:<14} {r.dtype:<9} {r.params:>12,} {r.step_s:>8.3f} {r.tokens_per_s:>10.0f} "
                  f"{r.tflops_achieved:>8.3f} {r.tflops_peak:>8.3f} {r.mfu:>6.1%} {mem:>8}")


if __name__ == "__main__":
    main()
