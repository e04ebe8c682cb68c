"""What a busy background worker on the same CPU costs a request's thread hand-overs, by the worker's priority.

An API request hands over between threads several times (the event loop, the thread pool, back); every hand-over
wakes a thread. This script pins itself to one CPU and measures the round trip of a two-thread ping-pong (one
wake-up each way, a 2 ms pause between rounds, as between requests) with nothing else on that CPU, then next to a
busy child process pinned to the same CPU that runs niced by ``service.validation.WORKER_NICE`` (what validation
and estimate workers were), then under ``SCHED_IDLE`` plus that niceness (what they are: ``_lower_priority``).
It prints p50 / p99 / p99.9 / max per case and the tail's ratios against the quiet case. Run it at the niceness
the API runs at (a script already reniced measures a worker that outranks it).

Command: ``.venv/bin/python bench/worker_priority.py [--rounds 5000]`` (Linux; SCHED_IDLE is Linux-only).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.validation import WORKER_NICE, _lower_priority

BUSY = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def ping_pong(rounds: int) -> list[float]:
    """Round-trip seconds of ``rounds`` hand-overs to a second thread and back."""
    there: queue.Queue[int | None] = queue.Queue()
    back: queue.Queue[int] = queue.Queue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=echo)
    thread.start()
    latencies = []
    for i in range(rounds):
        start = time.perf_counter()
        there.put(i)
        back.get()
        latencies.append(time.perf_counter() - start)
        time.sleep(0.002)
    there.put(None)
    thread.join()
    return latencies


def measure(case: str, cpu: int, rounds: int) -> dict[str, float]:
    busy = None
    if case != "quiet":
        busy = subprocess.Popen([sys.executable, "-c", BUSY, str(cpu)])
        if case == "niced":
            os.setpriority(os.PRIO_PROCESS, busy.pid, min(os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE, 19))
        else:
            _lower_priority(busy.pid)
        time.sleep(0.5)  # the busy loop is running
    try:
        latencies = ping_pong(rounds)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    q = statistics.quantiles(latencies, n=1000)
    return {"p50_ms": q[499] * 1e3, "p99_ms": q[989] * 1e3, "p99.9_ms": q[998] * 1e3, "max_ms": max(latencies) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not hasattr(os, "SCHED_IDLE"):
        sys.exit("SCHED_IDLE is Linux-only: nothing to compare on this platform")
    os.sched_setaffinity(0, {args.cpu})
    results = {case: measure(case, args.cpu, args.rounds) for case in ("quiet", "niced", "sched_idle")}
    quiet = results["quiet"]
    for case, r in results.items():
        tail = r["p99.9_ms"] / quiet["p99.9_ms"]
        print(f"{case:>10}: hand-over round trip p50 {r['p50_ms']:.3f}  p99 {r['p99_ms']:.3f}  p99.9 "
              f"{r['p99.9_ms']:.3f}  max {r['max_ms']:.2f} ms; vs quiet: p99.9 x{tail:.1f}, "
              f"max x{r['max_ms'] / quiet['max_ms']:.1f}")


if __name__ == "__main__":
    main()
