"""``bench/lora_forward_ab.py`` on the tiny preset against this checkout's own HEAD, so the benchmark cannot rot: it
loads the old ``GroupedLora`` from git, times both, and the two agree on the logits (in a clean checkout they are the
same code: difference 0; a change of the working tree may move them by rounding)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_lora_forward_ab_benchmark_runs_and_compares_a_revision_with_itself():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_forward_ab.py"), "--preset", "qwen-vl-tiny",
                           "--before-rev", "HEAD", "--repeats", "2", "--rows", "4"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    difference = re.search(r"max \|logits new - old\| \(mixed\) = (\S+)", out)
    assert difference and float(difference.group(1)) < 1e-4, out
    for line in ("min ms: base=", "old: mixed/single=", "new: mixed/single="):
        assert line in out, out
