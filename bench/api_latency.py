"""Control-plane benchmark: API latency under concurrency and upload throughput with peak server memory.

1. get-job and list-jobs p50/p99 at 32 concurrent clients, each on its own keep-alive connection
   (``python -m service`` under uvicorn, SQLite WAL, scheduler idle).
2. Upload of a 200 MB ``.jsonl`` bundle to local storage and to S3 (moto's server over HTTP): MB/s and the
   API process's peak RSS during the upload, next to its RSS before, so it is visible that memory does not scale
   with the file (the upload is spooled to disk and streamed to storage in 8 MB chunks).

Command: ``.venv/bin/python bench/api_latency.py [--upload-mb 200] [--requests 3200]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.net import free_port, wait_for_port  # noqa: E402

LINE = json.dumps({"messages": [{"role": "user", "content": "describe the picture " * 8},
                                {"role": "assistant", "content": "a red square on white " * 8}]}) + "\n"


def start_api(data_dir: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "QWENVL_DATA_DIR": str(data_dir), "QWENVL_MAX_UPLOAD_BYTES": str(1 << 30),
           "QWENVL_TENANT_REQUESTS_PER_SECOND": "0", **extra}  # one tenant's capacity: no per-tenant rate limit
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, proc, timeout=120)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the group: the API and its validation worker
    proc.wait()


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


async def hammer(url: str, key: str, path: str, total: int, clients: int = 32) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as c:
            for _ in range(n):
                t = time.perf_counter()
                r = await c.get(path)
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(worker(total // clients) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {**percentiles(latencies), "requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1)}


def latency(requests: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_api(Path(tmp), {})
        try:
            key = (Path(tmp) / "api_key").read_text().strip()
            h = {"Authorization": f"Bearer {key}"}
            fid = httpx.post(f"{url}/v1/files", headers=h, files={"file": ("t.jsonl", LINE * 20)},
                             data={"purpose": "fine-tune"}).json()["id"]
            jobs = [httpx.post(f"{url}/v1/fine_tuning/jobs", headers=h, json={"model": "qwen-vl-chat",
                                                                               "training_file": fid}).json()["id"]
                    for _ in range(4)]
            out = {"get_job": asyncio.run(hammer(url, key, f"/v1/fine_tuning/jobs/{jobs[0]}", requests)),
                   "list_jobs": asyncio.run(hammer(url, key, "/v1/fine_tuning/jobs?limit=20", requests))}
        finally:
            stop(proc)
    return out


def write_bundle(path: Path, mb: int) -> None:
    block = LINE * (1 << 20 // len(LINE) + 1)
    with path.open("w") as out:
        while out.tell() < mb << 20:
            out.write(block)


def upload(data: Path, extra: dict[str, str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_api(Path(tmp), extra)
        try:
            key = (Path(tmp) / "api_key").read_text().strip()
            api = psutil.Process(proc.pid)
            before, peak, done = api.memory_info().rss, [0], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], api.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            t = time.perf_counter()
            with data.open("rb") as fh:
                r = httpx.post(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                               files={"file": ("bundle.jsonl", fh)}, data={"purpose": "fine-tune"})
            wall = time.perf_counter() - t
            done.set()
            sampler.join()
            r.raise_for_status()
        finally:
            stop(proc)
    size = data.stat().st_size
    return {"mb": round(size / 1e6, 1), "seconds": round(wall, 2), "mb_per_s": round(size / 1e6 / wall, 1),
            "rss_before_mb": round(before / 1e6, 1), "rss_peak_mb": round(peak[0] / 1e6, 1)}


def s3_env() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    import boto3

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, moto)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="bench")
    return moto, {**env, "QWENVL_STORAGE_URI": "s3://bench/platform"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3200)
    args = parser.parse_args()
    results: dict[str, object] = {"latency_32_clients": latency(args.requests)}
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small.jsonl", Path(tmp) / "big.jsonl"
        write_bundle(small, max(1, args.upload_mb // 10))
        write_bundle(big, args.upload_mb)
        results["upload_local"] = {"small": upload(small, {}), "large": upload(big, {})}
        moto, env = s3_env()
        try:
            results["upload_s3"] = {"small": upload(small, env), "large": upload(big, env)}
        finally:
            stop(moto)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
