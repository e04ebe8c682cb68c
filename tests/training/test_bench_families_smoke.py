"""Smoke test of ``bench/train_families.py`` on the tiny Qwen2.5-VL preset, so the benchmark cannot rot: each of its
measurements runs in-process for a step or two (no timing is asserted; speed claims live in the script's output)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
PRESET = "qwen2.5-vl-tiny"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))  # the script imports its sibling train_throughput, as when run
        import train_families

        yield train_families
    sys.modules.pop("train_families", None)
    sys.modules.pop("train_throughput", None)


@pytest.fixture(scope="module")
def cpu_args(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bench_families")
    model, train = bench.prepare(root, PRESET, samples=4)
    args = bench.parse_args(["--preset", PRESET, "--epochs", "1", "--samples", "4", "--batch", "2",
                             "--memory-steps", "1", "--threads", "2"])
    args.workdir, args.model, args.train = str(root), str(model), str(train)
    return args


def test_ours_and_hf_trainer_train_the_same_steps_and_report_losses(bench, cpu_args):
    ours, hf = (bench.run_one(mode, cpu_args) for mode in bench.COMPARE)
    for result in (ours, hf):
        assert result["steps"] == 2  # 4 samples, batch 2, one epoch
        assert result["tokens_per_s"] > 0 and result["tokens_per_cpu_s"] > 0
        assert math.isfinite(result["final_loss"]) and math.isfinite(result["train_set_loss"])
    # Two steps at lr 1e-4 from the same random model and LoRA init: both trainers end near the same loss.
    assert bench.relative_difference(ours["train_set_loss"], hf["train_set_loss"]) < 0.02
    all_rounds = [[ours, hf]]
    bench.report_compare(all_rounds, cpu_args)  # the report reads every field it prints


def test_qlora_stores_the_language_model_linears_in_4_bit(bench, cpu_args):
    lora, qlora = (bench.run_one(mode, cpu_args) for mode in bench.MEMORY)
    assert lora["steps"] == qlora["steps"] == 1
    # fp32 is 4 bytes a weight; NF4 half a byte plus its block statistics.
    assert qlora["lm_linear_bytes"] < lora["lm_linear_bytes"] / 5
    assert qlora["param_bytes"] < lora["param_bytes"]
    bench.report_memory([[{**lora, "psutil_peak_rss_gib": 0.0}, {**qlora, "psutil_peak_rss_gib": 0.0}]], cpu_args)


def test_the_gpu_step_benchmark_runs_on_the_cpu(bench):
    args = bench.parse_args(["--steps-on-cpu", "--preset", PRESET, "--seq-len", "96", "--image-px", "112",
                             "--steps", "1", "--warmup", "1"])
    result = bench.run_one("steps-qlora", args)
    assert result["tokens"] == 96 and result["s_per_it"] > 0 and math.isfinite(result["loss"])
    assert "max_allocated_gib" not in result  # device memory only on CUDA


def test_child_commands_parse_back_to_the_same_options(bench, cpu_args):
    """What ``run_child`` passes to a fresh process is what this process measured with."""
    for mode in bench.COMPARE + bench.MEMORY + bench.STEPS:
        argv = bench.child_command(mode, cpu_args)[2:]
        child = bench.parse_args(argv)
        assert child.one == mode
        keys = ["preset", "device", "dtype", "threads"] + (
            ["seq_len", "image_px", "steps", "warmup"] if mode in bench.STEPS else
            ["epochs", "batch", "max_length", "lr", "memory_steps", "workdir", "model", "train"])
        assert {k: getattr(child, k) for k in keys} == {k: getattr(cpu_args, k) for k in keys}
