"""``bench/gpu_check.sh``, the one prepared run a GPU machine gets (issue 13), in its dry-run mode here: on the CPU,
tiny presets, short runs (``GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1``). Sessions with a device are rare and the device
time is one short lease, so the script must not rot in between: every check runs every code path of its GPU run and
must end with its row marked ok. (``bench/gpu_dryrun.sh`` runs the same in an environment holding only what the
device image holds; that one needs the package registry, so it is a manual step before a device run.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("environment", "gpu_tests", "sampling_step", "serve_v1_full_bf16", "serve_v1_memory", "train_qwen25vl_7b",
          "step_kernels")


def _dry_run(out: Path, **settings: str) -> tuple[subprocess.CompletedProcess, dict[str, str], str]:
    """The script in its CPU dry-run mode: (the process, {row: result}, the table and the logs' tails)."""
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable,
           "GPU_CHECK_WHEELS": str(out.parent / "no-wheels"), "OUT": str(out),
           "GPU_CHECK_PYTEST_MARK": "gpu", **settings}  # the test row's CPU cases run in this suite already
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    table = (out / "gpu_check.md").read_text()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in table.splitlines()[2:])}
    return done, rows, table + logs


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_check_in_its_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    done, rows, shown = _dry_run(out)
    assert rows == dict.fromkeys(CHECKS, "ok"), shown
    assert done.returncode == 0, done.stdout[-3000:]
    serve = (out / "serve_v1_full_bf16.log").read_text()
    for row in ("throughput tok/s: mixed=", "engine/static=", "32 requests of 2-8 new tokens", "longest inter-token gap="):
        assert row in serve, serve[-3000:]
    assert "peak memory" not in serve  # its own row
    assert "decode graphs (static, " in serve, serve[-3000:]  # (cuda on the device)
    assert "peak memory, 4 concurrent 256-token requests: after=" in (out / "serve_v1_memory.log").read_text()
    assert "skipped" in (out / "gpu_tests.log").read_text()  # the cuda cases, collected and skipped here
    train = (out / "train_qwen25vl_7b.log").read_text()
    assert "steps-lora" in train and "steps-qlora" in train, train[-3000:]
    assert "min ms per step: new=" in (out / "sampling_step.log").read_text()
    kernels = (out / "step_kernels.log").read_text()
    assert "kernels after  (working tree): base=" in kernels and "workload" not in kernels, kernels[-3000:]
    assert "per join: the prefill forward of 4 requests" in kernels, kernels[-3000:]


@pytest.mark.slow
def test_a_rerun_runs_only_the_rows_it_names_and_the_environment(tmp_path):
    """A lease has room for one full run and a short rerun of what failed (``GPU_CHECK_ONLY``)."""
    out = tmp_path / "out"
    done, rows, shown = _dry_run(out, GPU_CHECK_ONLY="sampling_step fused_siblings serve_v1_latency engine_process "
                                                     "prep_beside_decode")
    assert rows == {"environment": "ok", "sampling_step": "ok", "fused_siblings": "ok", "serve_v1_latency": "ok",
                    "engine_process": "ok", "prep_beside_decode": "ok"}, shown  # (the last four: opt-in rows)
    assert done.returncode == 0 and sorted(p.name for p in out.glob("*.log")) == [
        "engine_process.log", "environment.log", "fused_siblings.log", "prep_beside_decode.log", "sampling_step.log",
        "serve_v1_latency.log"], shown
    assert "fused/separate=" in (out / "fused_siblings.log").read_text()
    process = (out / "engine_process.log").read_text()
    assert "loop work 0.6 ms an item: process / thread " in process, process[-3000:]
    prep = (out / "prep_beside_decode.log").read_text()
    assert "decode tokens/s with the preparation in a process / with none: " in prep, prep[-3000:]
    latency = (out / "serve_v1_latency.log").read_text()
    for row in ("batch=16 prefill_chunk_tokens=0: TTFT p50=", "batch=16 prefill_chunk_tokens=64: TTFT",
                "batch=4 prefill_chunk_tokens=512: TTFT"):  # the CPU's default batch, then the one asked for
        assert row in latency, latency
