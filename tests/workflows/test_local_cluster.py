"""The cluster a run starts for itself when it finds none (``qwenvl finetune`` on a laptop): Ray Train's
placement-group cleaner watches the run through Ray's state API, which the dashboard serves; without it the cleaner
logged a warning every second of the run into the user's terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
import ray
from ray.util.state import list_actors
from workflows.finetune import local_cluster_options
context = ray.init(**local_cluster_options(1), _temp_dir=sys.argv[1], logging_level="ERROR")
# this cluster's, by address: without one the state API looks for a cluster on the machine (another test's too)
print("actors", len(list_actors(address=ray.get_runtime_context().gcs_address)))
print("dashboard", context.dashboard_url)
ray.shutdown()
"""


def test_a_cluster_started_by_the_run_serves_the_state_api_on_loopback_only():
    temp = tempfile.mkdtemp(prefix="lc", dir="/tmp")  # (Ray's socket paths must stay short)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, temp], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["actors"].isdigit()  # the state API answered (it raised ServerUnavailable without the dashboard)
    assert lines["dashboard"].startswith("127.0.0.1:"), lines
