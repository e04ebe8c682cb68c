"""``bench/gpu_check.sh``, the prepared run a GPU machine gets (issue 13), in its dry-run mode here: on the CPU,
tiny presets, short runs (``GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1``). Sessions with a device are rare and the device
time is one short lease, so the script must not rot in between: every check runs every code path of its GPU run and
must end with its row marked ok; and a lease runs it in passes, so which rows each pass runs is pinned too.
(``bench/gpu_dryrun.sh`` runs the same in an environment holding only what the device image holds; that one needs the
package registry, so it is a manual step before a device run.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSES = {1: ("gpu_tests", "serve_v1_full_bf16", "fused_siblings"),
          2: ("serve_v1_latency", "engine_process", "train_qwen25vl_7b", "sampling_step"),
          3: ("serve_v1_memory", "step_kernels", "prep_beside_decode"),
          4: ("serve_qwen25vl_7b",)}


def _env(out: Path, **settings: str) -> dict[str, str]:
    """The script's environment: this one's without its own GPU_CHECK_ settings, its table and logs in ``out``,
    no carried wheels, then ``settings``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")},
            "GPU_CHECK_WHEELS": str(out.parent / "no-wheels"), "OUT": str(out), **settings}


def _rows(table: str) -> dict[str, str]:
    """{row: result} of the script's table."""
    return {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in table.splitlines()[2:])}


@pytest.mark.parametrize(("settings", "wanted"), [
    ({}, PASSES[1]),  # a lease's first call
    ({"GPU_CHECK_PASS": "2"}, PASSES[2]),
    ({"GPU_CHECK_PASS": "3 4"}, PASSES[3] + PASSES[4]),
    ({"GPU_CHECK_ONLY": "sampling_step serve_qwen25vl_7b", "GPU_CHECK_PASS": "1"}, ("sampling_step", "serve_qwen25vl_7b")),
])
def test_each_pass_runs_its_rows_and_the_environment_in_order(tmp_path, settings, wanted):
    """Which rows a call runs (each command replaced by ``true``, so only the selection runs): the environment row
    always, then the pass's rows (or those named), in the script's order."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=_env(out, PYTHON="true", **settings),
                          capture_output=True, text=True, timeout=60)
    rows = _rows((out / "gpu_check.md").read_text())
    order = [name for p in sorted(PASSES) for name in PASSES[p]]
    assert list(rows) == ["environment", *sorted(wanted, key=order.index)], done.stdout
    assert set(rows.values()) == {"ok"} and done.returncode == 0, done.stdout


def test_a_pass_that_does_not_exist_is_refused_by_name(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")],
                          env=_env(tmp_path / "out", PYTHON="true", GPU_CHECK_PASS="1 5"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "GPU_CHECK_PASS: no pass '5' (the passes are 1, 2, 3 and 4)" in done.stdout


def test_every_row_belongs_to_one_pass():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    checks = [line.split()[1:3] for line in script.splitlines() if line.startswith("check ")]
    assert {name: int(p) for name, p in checks} == {"environment": 0, **{name: p for p, names in PASSES.items()
                                                                          for name in names}}


def _dry_run(out: Path, **settings: str) -> tuple[subprocess.CompletedProcess, dict[str, str], str]:
    """The script in its CPU dry-run mode: (the process, {row: result}, the table and the logs' tails)."""
    env = _env(out, GPU_CHECK_DEVICE="cpu", GPU_CHECK_SMOKE="1", PYTHON=sys.executable,
               GPU_CHECK_PYTEST_MARK="gpu", **settings)  # the test row's CPU cases run in this suite already
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    table = (out / "gpu_check.md").read_text()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
    return done, _rows(table), table + logs


@pytest.mark.slow
def test_the_first_two_passes_run_every_check_in_their_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    done, rows, shown = _dry_run(out, GPU_CHECK_PASS="1 2")
    assert rows == dict.fromkeys(("environment", *PASSES[1], *PASSES[2]), "ok"), shown
    assert done.returncode == 0, done.stdout[-3000:]
    serve = (out / "serve_v1_full_bf16.log").read_text()
    for row in ("throughput tok/s: mixed=", "engine/static=", "32 requests of 2-8 new tokens"):
        assert row in serve, serve[-3000:]
    assert "decode graphs (static, " in serve, serve[-3000:]  # (cuda on the device)
    assert "decode graphs (static), engine vs static batches of 16: equal lengths engine=" in serve, serve[-3000:]
    assert "peak memory" not in serve and "inter-token gap" not in serve  # rows of their own
    assert "skipped" in (out / "gpu_tests.log").read_text()  # the cuda cases, collected and skipped here
    assert "fused/separate=" in (out / "fused_siblings.log").read_text()
    latency = (out / "serve_v1_latency.log").read_text()
    for row in ("batch=16 prefill_chunk_tokens=0: TTFT p50=", "batch=16 prefill_chunk_tokens=64: TTFT",
                "batch=4 prefill_chunk_tokens=512: TTFT", "longest inter-token gap="):
        assert row in latency, latency  # the CPU's default batch, then the one asked for
    process = (out / "engine_process.log").read_text()
    assert "loop work 0.6 ms an item: process / thread " in process, process[-3000:]
    train = (out / "train_qwen25vl_7b.log").read_text()
    assert "steps-lora" in train and "steps-qlora" in train, train[-3000:]
    assert "min ms per step: new=" in (out / "sampling_step.log").read_text()


@pytest.mark.slow
def test_the_rows_beyond_two_passes_run_in_their_cpu_dry_run_when_named(tmp_path):
    """A lease has room for passes 1 and 2 and a short rerun of what failed (``GPU_CHECK_ONLY``); the others run
    when named too."""
    out = tmp_path / "out"
    done, rows, shown = _dry_run(out, GPU_CHECK_ONLY=" ".join(PASSES[3] + PASSES[4]))
    assert rows == dict.fromkeys(("environment", *PASSES[3], *PASSES[4]), "ok"), shown
    assert done.returncode == 0 and sorted(p.name for p in out.glob("*.log")) == sorted(
        f"{name}.log" for name in ("environment", *PASSES[3], *PASSES[4])), shown
    assert "peak memory, 4 concurrent 256-token requests: after=" in (out / "serve_v1_memory.log").read_text()
    kernels = (out / "step_kernels.log").read_text()
    assert "kernels after  (working tree): base=" in kernels and "workload" not in kernels, kernels[-3000:]
    assert "per join: the prefill forward of 4 requests" in kernels, kernels[-3000:]
    prep = (out / "prep_beside_decode.log").read_text()
    assert "decode tokens/s with the preparation in a process / with none: " in prep, prep[-3000:]
    family = (out / "serve_qwen25vl_7b.log").read_text()
    assert "mixed/base=" in family and "decode graphs (static, " in family, family[-3000:]
