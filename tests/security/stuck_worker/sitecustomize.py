"""Test-only start-up hook (on ``PYTHONPATH`` of the API under test in ``test_slow_clients``): a validation worker
started for a base model whose directory is named ``stuck-model`` hangs, like a worker whose tokenizer load
hangs on a stuck network filesystem. Every other process, the API included, starts normally."""

import sys
import time

_argv = getattr(sys, "orig_argv", [])
if "service.validation_worker" in _argv and any(arg.rstrip("/").endswith("stuck-model") for arg in _argv):
    time.sleep(3600)
