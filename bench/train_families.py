"""Training benchmark of the transformers-native families (issue 12): our trainer vs HF ``Trainer``, LoRA vs Q-LoRA.

CPU (default; preset ``qwen2.5-vl-small``, random weights written by ``family.materialize``), every measurement in a
fresh process with one math thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), each ``--rounds`` times
(order alternating; every round is printed):

  ours        ``qwenvl_core.training.Trainer``: length-grouped batches, dynamic padding, the LM head only at
              supervised positions (the frozen-vision-tower feature cache does not apply to these families)
  hf-dynamic  ``transformers.Trainer`` + peft on the same model directory, LoRA, data, epochs, batch, lr, AdamW
              (beta2 0.95, wd 0.1), cosine schedule and seed; transformers' own forward and loss; batches padded
              to their longest row (our ``Collator``: dynamic padding)
  lora/qlora  our trainer for ``--memory-steps`` steps, the language model in fp32 or in 4-bit NF4 (bitsandbytes,
              ``quantize_language_model``): peak RSS sampled by this process with psutil every 50 ms plus the
              child's own high-water mark (``ru_maxrss``), and the model's parameter bytes

The helpers shared with the v1 benchmark (spec, our run, the HF run, the train-set loss) are ``train_throughput``'s.
Throughput counts real (non-padding) tokens per second of the training steps, by the wall clock and per CPU-second of
the process (one math thread: the compute a run took, whatever else shares the machine's cores). The losses compared are the mean of
the last three step losses and the train-set loss (each trained model evaluated the same way over the whole
training file afterwards; the last steps' batches differ between samplers).

CUDA (``--device cuda``, default preset ``qwen2.5-vl-7b``): random weights built on the device in bf16 (no checkpoint
is written), LoRA and Q-LoRA each in a fresh process; one sample of ``--seq-len`` tokens (one ``--image-px`` image,
the rest text, the text after the image supervised), our trainer's step (``loss_only`` forward, backward, clip,
AdamW, schedule: ``strategies.Engine``) timed after warm-up between ``torch.cuda.synchronize()`` calls; seconds
per iteration and ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the training steps.

Usage:
  .venv/bin/python bench/train_families.py                       # CPU comparison + memory (about 15 minutes)
  .venv/bin/python bench/train_families.py --device cuda --preset qwen2.5-vl-7b --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from train_throughput import make_spec, run_hf, run_ours

COMPARE = ("ours", "hf-dynamic")
MEMORY = ("lora", "qlora")
STEPS = ("steps-lora", "steps-qlora")


# ----- CPU: data, model, the comparison ---------------------------------------------------------------------
def prepare(root: Path, preset: str, samples: int) -> tuple[Path, Path]:
    """A random ``preset`` model directory and a synthetic image+text training file (OpenAI format)."""
    from qwenvl_core.data.formats import DataFormat
    from qwenvl_core.data.synth import write_synth_dataset
    from qwenvl_core.models.registry import family_for_preset

    model = family_for_preset(preset).materialize(preset, root / "model", seed=0)
    data = write_synth_dataset(root / "data", DataFormat.OPENAI, n=samples + 1, seed=0, image_size=224,
                               bundles=False, val_fraction=1 / (samples + 1))  # ``samples`` to train on
    return model, data.train


def run_compare(mode: str, spec: Any) -> dict[str, Any]:
    """Our trainer or HF ``Trainer`` with dynamic padding on ``spec``; tokens/s and losses."""
    return run_ours(spec) if mode == "ours" else run_hf(spec, padded=False)


def run_memory(spec: Any) -> dict[str, Any]:
    """Our trainer on ``spec`` (LoRA or Q-LoRA); the model's parameter bytes (the whole model and its LM linears)."""
    from qwenvl_core.training import Trainer

    trainer = Trainer(spec)
    result = trainer.run()
    return {"steps": result.train_state.step, **parameter_bytes(trainer.model, trainer.family)}


def parameter_bytes(model: Any, family: Any) -> dict[str, int]:
    """Bytes of every parameter (4-bit weights as stored: packed bytes plus their quantisation statistics), and of
    the language model's linear weights alone (the part Q-LoRA quantises)."""
    total, lm_linear = 0, 0
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            size = param.numel() * param.element_size() + _quant_state_bytes(param)
            total += size
            full = f"{name}.{pname}"
            if pname == "weight" and "lora_" not in full and not full.endswith("lm_head.weight") \
                    and family.component_of(full) == "language" and param.dim() >= 1 \
                    and type(module).__name__ in ("Linear", "Linear4bit"):
                lm_linear += size
    return {"param_bytes": total, "lm_linear_bytes": lm_linear}


def _quant_state_bytes(param: Any) -> int:
    """Bytes of a bitsandbytes 4-bit weight's statistics (absmax, and the double-quantised absmax's own)."""
    state = getattr(param, "quant_state", None)
    total = 0
    while state is not None:
        for tensor in (getattr(state, "absmax", None), getattr(state, "code", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        state = getattr(state, "state2", None)
    return total


# ----- CUDA (or CPU, to check it): our trainer's step on a full-size preset built in memory -----------------
def run_steps(preset: str, device: str, dtype_name: str, qlora: bool, seq_len: int, image_px: int,
              steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per iteration and peak device memory of our step (module docstring, CUDA) on random weights."""
    import torch

    from qwenvl_core.models.dtypes import default_dtype
    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.specs import Hyperparameters, LoraSpec
    from qwenvl_core.training.lora import apply_lora, prepare_qlora_base
    from qwenvl_core.training.optim import build_optimizer, build_scheduler
    from qwenvl_core.training.strategies import Engine

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    cuda = device.startswith("cuda")
    family = family_for_preset(preset)
    config = family.build_config(preset)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = family.build_model(config).to(dtype)
    # What load_base_model does after loading: the forward contract, and for Q-LoRA the NF4 language model
    model = family.forward_contract(model)
    if qlora:
        prepare_qlora_base(model, family, dtype)
    model = apply_lora(model, family, LoraSpec())
    hp = Hyperparameters(learning_rate=1e-4, max_steps=warmup + steps)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], hp)
    engine = Engine(model, optimizer, build_scheduler(optimizer, hp, warmup + steps), hp.max_grad_norm, 1)
    batch = synthetic_batch(config, seq_len, image_px, device, dtype)
    model.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> float:
        loss = engine.model(**batch, loss_only=True).loss
        engine.backward(loss)
        engine.step(True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        weights_allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        losses.append(step())  # float(loss) waits for the step's kernels
        sync()
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"s_per_it": sorted(times)[len(times) // 2], "s_per_it_mean": sum(times) / len(times),
                           "tokens": int(batch["attention_mask"].sum()), "loss": losses[-1],
                           **parameter_bytes(model, family)}
    if cuda:
        out |= {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "allocated_after_warmup_gib": weights_allocated / 2**30,
                "gpu": torch.cuda.get_device_name()}
    out["saved_bytes"] = saved_for_backward(engine.model, batch)  # (after the peak memory figures: a forward more)
    return out


def saved_for_backward(model: Any, batch: dict[str, Any]) -> int:
    """Bytes of the tensors one forward keeps for its backward (each storage once; the weights themselves, which
    autograd also keeps, not counted): the step's activation memory, the same on any device."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch, loss_only=True).loss
    del loss  # (no backward: the graph and what it kept go with it)
    return sum(kept.values())


def synthetic_batch(config: Any, seq_len: int, image_px: int, device: str, dtype: Any) -> dict[str, Any]:
    """One row of ``seq_len`` tokens: text, one ``image_px`` square image's tokens, text; the text after the image
    supervised; ``pixel_values`` random in the processor's layout (patches x channels*temporal*patch*patch)."""
    import torch

    from qwenvl_core.models.hf_vl.materialize import ordinary_tokens

    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = image_px // patch
    side -= side % merge
    n_image = (side // merge) ** 2
    prefix = 16
    suffix = seq_len - prefix - n_image - 2
    if suffix < 8:
        raise SystemExit(f"--seq-len {seq_len} is too short for a {image_px} px image ({n_image} tokens)")
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, ordinary_tokens(config), (prefix + suffix,), generator=gen)
    ids = torch.cat([text[:prefix], torch.tensor([config.vision_start_token_id]),
                     torch.full((n_image,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     text[prefix:]])[None]
    labels = ids.clone()
    labels[:, : prefix + n_image + 2] = -100
    channels = vision.in_channels if hasattr(vision, "in_channels") else vision.in_chans
    pixels = torch.randn(side * side, channels * vision.temporal_patch_size * patch * patch, generator=gen)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "image_grid_thw": torch.tensor([[1, side, side]], device=device)}


# ----- processes ----------------------------------------------------------------------------------------------
def run_one(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if mode in STEPS:
        result = run_steps(args.preset, args.device, args.dtype, mode == "steps-qlora", args.seq_len, args.image_px,
                           args.steps, args.warmup)
    else:
        out = Path(args.workdir) / f"run-{mode}-{time.time_ns()}"
        spec = make_spec(Path(args.model), Path(args.train), out, args, qlora=mode == "qlora")
        if mode in MEMORY:
            spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
                update={"max_steps": args.memory_steps})})
            result = run_memory(spec)
        else:
            result = run_compare(mode, spec)
    result["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, **result}


def child_command(mode: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--preset", args.preset, "--device",
           args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    if mode in STEPS:
        return cmd + ["--seq-len", str(args.seq_len), "--image-px", str(args.image_px), "--steps", str(args.steps),
                      "--warmup", str(args.warmup)]
    return cmd + ["--workdir", args.workdir, "--model", args.model, "--train", args.train, "--epochs",
                  str(args.epochs), "--batch", str(args.batch), "--max-length", str(args.max_length), "--lr",
                  str(args.lr), "--memory-steps", str(args.memory_steps)]


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``mode`` in a fresh process; its peak RSS sampled with psutil every 50 ms while it runs."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(child_command(mode, args), stdout=out, stderr=err, text=True, env=env)
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        proc.wait()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {**result, "psutil_peak_rss_gib": peak / 2**30}


def rounds(modes: tuple[str, ...], args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """``args.rounds`` rounds over ``modes``, the order alternating (a noisy neighbour hits both sides)."""
    out = []
    for round_ in range(args.rounds):
        order = modes if round_ % 2 == 0 else tuple(reversed(modes))
        results = {mode: run_child(mode, args) for mode in order}
        out.append([results[mode] for mode in modes])
    return out


# ----- report -------------------------------------------------------------------------------------------------
def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def report_compare(all_rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n## ours vs HF Trainer (dynamic padding): {args.preset}, {args.samples} samples x {args.epochs} epochs, "
          f"batch {args.batch}, lr {args.lr}, max_length {args.max_length}, fp32, {args.threads} thread(s)")
    print(f"{'round':>5} {'mode':<11} {'tokens/s':>9} {'tokens/CPU-s':>13} {'steps':>6} {'last-3 loss':>12} "
          f"{'train-set loss':>15} {'ru_maxrss GiB':>14}")
    for i, (ours, hf) in enumerate(all_rounds, 1):
        for r in (ours, hf):
            print(f"{i:>5} {r['mode']:<11} {r['tokens_per_s']:>9.1f} {r['tokens_per_cpu_s']:>13.1f} {r['steps']:>6} "
                  f"{r['final_loss']:>12.4f} {r['train_set_loss']:>15.4f} {r['ru_maxrss_gib']:>14.2f}")
        wall, cpu = (ours[k] / hf[k] for k in ("tokens_per_s", "tokens_per_cpu_s"))
        print(f"round {i}: ours / hf-dynamic = {wall:.2f}x wall-clock, {cpu:.2f}x per CPU-second (target >= 1.3x); "
              f"relative difference of the train-set loss "
              f"{relative_difference(ours['train_set_loss'], hf['train_set_loss']):.2%}, of the last-3 loss "
              f"{relative_difference(ours['final_loss'], hf['final_loss']):.2%}")


def report_memory(all_rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n## peak memory, LoRA vs Q-LoRA (4-bit NF4 language model): {args.preset}, our trainer, "
          f"{args.memory_steps} steps of batch {args.batch}, fp32, each in a fresh process")
    print(f"{'round':>5} {'variant':<7} {'psutil peak RSS GiB':>20} {'ru_maxrss GiB':>14} {'param MiB':>10} "
          f"{'LM linear MiB':>14}")
    for i, results in enumerate(all_rounds, 1):
        for r in results:
            print(f"{i:>5} {r['mode']:<7} {r['psutil_peak_rss_gib']:>20.3f} {r['ru_maxrss_gib']:>14.3f} "
                  f"{r['param_bytes'] / 2**20:>10.1f} {r['lm_linear_bytes'] / 2**20:>14.1f}")
    print("GPU memory (torch.cuda.max_memory_allocated) needs a GPU: run with --device cuda.")


def report_steps(results: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n## our training step: {args.preset}, {args.dtype}, {args.device}, 1 x {args.seq_len} tokens "
          f"({args.image_px} px image), {args.warmup} warm-up + {args.steps} timed steps, LoRA r 64 official targets")
    print(f"{'round':>5} {'variant':<11} {'s/it (median)':>13} {'s/it (mean)':>12} {'param GiB':>10} "
          f"{'saved for backward GiB':>22} {'max alloc GiB':>14} {'max reserved GiB':>17} {'host peak RSS GiB':>18}")
    for i, round_ in enumerate(results, 1):
        for r in round_:
            print(f"{i:>5} {r['mode']:<11} {r['s_per_it']:>13.3f} {r['s_per_it_mean']:>12.3f} "
                  f"{r['param_bytes'] / 2**30:>10.2f} {r['saved_bytes'] / 2**30:>22.3f} "
                  f"{r.get('max_allocated_gib', float('nan')):>14.2f} "
                  f"{r.get('max_reserved_gib', float('nan')):>17.2f} {r['psutil_peak_rss_gib']:>18.2f}")
    if not args.device.startswith("cuda"):
        print("(CPU: no device memory figures; this checks the GPU command's code path)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu: the comparison and RSS; cuda: step timing and memory")
    parser.add_argument("--preset", default=None, help="default: qwen2.5-vl-small (cpu), qwen2.5-vl-7b (cuda)")
    parser.add_argument("--rounds", type=int, default=2, help="every measurement this many times (all reported)")
    parser.add_argument("--threads", type=int, default=1, help="math threads per process on the CPU")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48, help="training samples")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--memory-steps", type=int, default=4, help="training steps of each memory variant")
    parser.add_argument("--skip-compare", action="store_true", help="CPU: only the memory variants")
    parser.add_argument("--skip-memory", action="store_true", help="CPU: only the throughput comparison")
    parser.add_argument("--steps-on-cpu", action="store_true", help="run the --device cuda step benchmark on the CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="step benchmark dtype; default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the step benchmark")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", choices=COMPARE + MEMORY + STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the device's defaults for ``--preset`` and ``--dtype`` filled in."""
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("qwen2.5-vl-7b" if cuda else "qwen2.5-vl-small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    return args


def main() -> None:
    args = parse_args()
    cuda = args.device.startswith("cuda")
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; {' '.join(sys.argv[1:]) or '(defaults)'}")
    if cuda or args.steps_on_cpu:
        report_steps(rounds(STEPS, args), args)
        return
    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-families-") as tmp:
        model, train = prepare(Path(tmp), args.preset, args.samples)
        args.workdir, args.model, args.train = tmp, str(model), str(train)
        if not args.skip_compare:
            report_compare(rounds(COMPARE, args), args)
        if not args.skip_memory:
            report_memory(rounds(MEMORY, args), args)


if __name__ == "__main__":
    main()
