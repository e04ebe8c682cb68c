"""Run a snippet in a fresh interpreter. The infra tests use it for everything that imports Ray: Ray reads its
authentication mode once per process, so importing it here would break later tests that start a token-auth
cluster in the pytest process (tests/service)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, payload: Any = None, timeout: float = 120) -> Any:
    """Run ``code`` (reads JSON ``payload`` from stdin, prints one JSON document); its decoded output."""
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
