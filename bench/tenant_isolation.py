"""Tenant isolation under load: does tenant A's flood slow tenant B down?

The API (``python -m service``'s uvicorn options, local SQLite and storage in a temp dir, the chat route over an
in-process engine on the tiny random model) runs in a subprocess of this script, on loopback, with the default
admission settings. Tenant B measures, one request at a time (``GET /v1/fine_tuning/jobs`` paced at 30/s, below
its rate limit, and a small text chat completion, 8 new tokens, at most 10/s), alone for ``--unloaded-seconds``, then
while tenant A floods for ``--seconds`` (from its own process), ``--rounds`` times per scenario of ``--scenarios``
(``all`` of the following at once, then each alone):

- ``stalls``: ``--stalls`` connections that send an upload's headers and a first chunk, then stall (reopened
  when answered),
- ``upload``: 2 upload loops (4 MB ``.jsonl`` each; every upload is then validated in a worker process),
- ``estimate``: 2 estimate loops (the estimate worker process; one per tenant runs, the other gets 429),
- ``chat``: 4 chat loops, each request with one image of the largest allowed size class (a ~15 MB noise PNG),
- ``get``: 8 loops of ``GET`` as fast as they are answered (held to the rate limit: 429s).

It prints B's p50/p99 for both requests unloaded and loaded per scenario, the loaded/unloaded p99 ratio of the
samples pooled over the rounds (target <= 3) and of each round; the alternation puts the baseline into the same
minutes as the load, as the state of a shared machine moves the unloaded p99 by 2-3x within an hour; also
the server process's CPU share while B measured (CPU seconds per second, its threads; its worker processes not
counted), and the status codes each side got (the single scenarios show which part of the flood costs B the most). Every
loop is bounded in time and count; nothing leaves the machine.

Where the flood client runs (``--flood-cpus``): in a real attack tenant A's client runs on A's machines, not on the
server's cores; here it is one Python process that builds and sends the flood, and on a 2-vCPU machine it takes a
core's worth of CPU away from the server and from B's client (sending a 20 MB body that the server refuses costs
the client far more than the server). ``--flood-cpus last`` (the default on machines with 2 CPUs or more) pins
the flood process to the last CPU and the server (with its validation / estimate workers) and B to the others,
for the unloaded measurement as well, so the ratio says what A's requests cost the server, not what A's client
costs the machine. ``--flood-cpus shared`` runs everything on every CPU (the older measurement). The layout is
printed with the result.

Command: ``.venv/bin/python bench/tenant_isolation.py [--seconds 30] [--stalls 16] [--scenarios all,get]
[--rounds 3] [--unloaded-seconds 12] [--flood-cpus last|shared]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.net import free_port, wait_for_port  # noqa: E402

BASE = "qwen-vl-tiny"
ADMIN = "bench-admin-key-0123456789abcdef"
LINE = json.dumps({"messages": [{"role": "user", "content": "describe the picture " * 8},
                                {"role": "assistant", "content": "a red square on white " * 8}]}) + "\n"


# ----- the server (a subprocess: ``tenant_isolation.py --serve``) ---------------------------------------------------
def serve(port: int, model_dir: str) -> None:
    """The control plane with the chat route over an in-process engine, under ``python -m service``'s options."""
    from qwenvl_core.serving.chat import InProcessBackend
    from qwenvl_core.serving.engine import EngineConfig, ServingEngine
    from service.__main__ import serve as run
    from service.main import create_app
    from service.routes.chat import mount_chat
    from service.settings import Settings

    settings = Settings()
    app = create_app(settings)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig())
    mount_chat(app, InProcessBackend({BASE: engine}))
    run(app, settings.max_ongoing_requests, "127.0.0.1", port, log_level="warning")


def start_server(tmp: Path, model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "QWENVL_DATA_DIR": str(tmp / "data"), "QWENVL_ADMIN_KEY": ADMIN,
           "QWENVL_BASE_MODELS": json.dumps({BASE: str(model_dir)})}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model-dir", str(model_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "api.log", "wb"),
                            start_new_session=True)
    wait_for_port(port, proc, timeout=180)
    return proc, f"http://127.0.0.1:{port}"


# ----- measuring ---------------------------------------------------------------------------------------------------
def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"n": len(samples), "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


async def timed_loop(call: Callable[[], Awaitable[httpx.Response]], seconds: float, max_count: int,
                     interval_s: float, statuses: Counter[str], label: str) -> list[float]:
    """Latencies of ``call`` repeated one at a time, at most every ``interval_s``, for ``seconds`` / ``max_count``."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(latencies) < max_count:
        start = time.perf_counter()
        resp = await call()
        latencies.append(time.perf_counter() - start)
        statuses[f"{label} {resp.status_code}"] += 1
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - start)))
    return latencies


async def measure_b(url: str, key: str, seconds: float, statuses: Counter[str]) -> dict[str, list[float]]:
    chat = {"model": BASE, "max_tokens": 8, "messages": [{"role": "user", "content": "what colour is the sky?"}]}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as get_client, \
            httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as chat_client:
        gets, chats = await asyncio.gather(
            timed_loop(lambda: get_client.get("/v1/fine_tuning/jobs"), seconds, 1000, 1 / 30, statuses, "B get"),
            timed_loop(lambda: chat_client.post("/v1/chat/completions", json=chat), seconds, 200, 1 / 10, statuses,
                       "B chat"))
    return {"get": gets, "chat": chats}


# ----- tenant A's flood ---------------------------------------------------------------------------------------------
def noise_png(side: int) -> bytes:
    """A random-noise RGB PNG (incompressible: ~3 bytes per pixel)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def stall_loop(port: int, key: str, end: float, statuses: Counter[str]) -> None:
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000000\r\n\r\n--x\r\n").encode()
    while time.monotonic() < end:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=max(0.1, end - time.monotonic()))
            statuses[f"A stall {line.split(b' ')[1].decode() if line else 'closed'}"] += 1
        except TimeoutError:
            statuses["A stall held to the end"] += 1
        finally:
            writer.close()
        await asyncio.sleep(0.05)


async def request_loop(end: float, statuses: Counter[str], label: str,
                       send: Callable[[], Awaitable[httpx.Response]]) -> None:
    """Send as fast as answered; after a 429 or an error wait a quarter of a second (at most the Retry-After)."""
    while time.monotonic() < end:
        try:
            resp = await send()
            statuses[f"A {label} {resp.status_code}"] += 1
            if resp.status_code == 429:
                await asyncio.sleep(min(float(resp.headers.get("retry-after", "1")), 1.0) / 4)
        except httpx.HTTPError as exc:
            statuses[f"A {label} {type(exc).__name__}"] += 1
            await asyncio.sleep(0.25)


FLOODS = ("stalls", "get", "upload", "estimate", "chat")
EXTRA = ("chat_parse",)  # diagnosis only: the chat body to an unknown model (parsed, then 404; no image decoded)


async def flood_a(url: str, port: int, key: str, file_id: str, seconds: float, stalls: int, kinds: tuple[str, ...],
                  statuses: Counter[str]) -> None:
    """Tenant A's loops of the given ``kinds`` (``FLOODS``, ``EXTRA``) for ``seconds``; bodies encoded once."""
    upload = (LINE * (4 * 1024 * 1024 // len(LINE))).encode()
    image = "data:image/png;base64," + base64.b64encode(noise_png(2200)).decode()
    message = {"model": BASE, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is this?"}]}]}
    chat, unknown = (json.dumps({**message, "model": model}).encode() for model in (BASE, "no-such-model"))
    estimate = {"model": BASE, "training_file": file_id}
    end = time.monotonic() + seconds
    as_json = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64),
                                 headers={"Authorization": f"Bearer {key}"}) as a:
        loops: list[Awaitable[None]] = []
        if "stalls" in kinds:
            loops += [stall_loop(port, key, end, statuses) for _ in range(stalls)]
        if "upload" in kinds:
            loops += [request_loop(end, statuses, "upload", lambda: a.post(
                "/v1/files", files={"file": ("flood.jsonl", upload)}, data={"purpose": "fine-tune"}))
                for _ in range(2)]
        if "estimate" in kinds:
            loops += [request_loop(end, statuses, "estimate", lambda: a.post("/v1/fine_tuning/estimate",
                                                                             json=estimate)) for _ in range(2)]
        if "chat" in kinds:
            loops += [request_loop(end, statuses, "chat", lambda: a.post("/v1/chat/completions", content=chat,
                                                                         headers=as_json))
                      for _ in range(4)]
        if "chat_parse" in kinds:
            loops += [request_loop(end, statuses, "chat_parse", lambda: a.post(
                "/v1/chat/completions", content=unknown, headers=as_json)) for _ in range(4)]
        if "get" in kinds:
            loops += [request_loop(end, statuses, "get", lambda: a.get("/v1/fine_tuning/jobs")) for _ in range(8)]
        await asyncio.gather(*loops)


def flood_process(url: str, port: int, key: str, file_id: str, seconds: float, stalls: int, kinds: tuple[str, ...],
                  cpus: set[int] | None, results: Any) -> None:
    """``flood_a`` in its own process (its client work must not delay B's measurements), on ``cpus`` (None: any);
    statuses to ``results``."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    statuses: Counter[str] = Counter()
    asyncio.run(flood_a(url, port, key, file_id, seconds, stalls, kinds, statuses))
    results.put(dict(statuses))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` so far, all its threads (its child processes not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----- the run -----------------------------------------------------------------------------------------------------
def summary(unloaded: dict[str, list[float]], loaded: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for what in ("get", "chat"):
        before, during = percentiles(unloaded[what]), percentiles(loaded[what])
        out[what] = {"loaded": during, "p99_ratio": round(during["p99_ms"] / before["p99_ms"], 2),
                     "p50_ratio": round(during["p50_ms"] / before["p50_ms"], 2)}
    return out


def cpu_layout(choice: str) -> tuple[set[int] | None, set[int] | None]:
    """(CPUs of the server and B, CPUs of A's flood client) for ``--flood-cpus``: ``last`` gives the flood client
    the last CPU and the rest to the server and B (on one CPU, or with ``shared``: everything everywhere)."""
    available = sorted(os.sched_getaffinity(0))
    if choice == "shared" or len(available) < 2:
        return None, None
    return set(available[:-1]), {available[-1]}


async def flood_round(url: str, port: int, key: str, file_id: str, seconds: float, stalls: int,
                      kinds: tuple[str, ...], flood_cpus: set[int] | None, server_pid: int, b_key: str,
                      b_statuses: Counter[str]) -> tuple[dict[str, list[float]], float, dict[str, int]]:
    """One flood of ``kinds`` from its own process: B's latencies in its middle, the server's CPU share meanwhile,
    A's status codes; returns after the flood's validations and estimates drained."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    flood = context.Process(target=flood_process, args=(url, port, key, file_id, seconds, stalls, kinds, flood_cpus,
                                                        results))
    flood.start()
    await asyncio.sleep(4)  # let the flood build up (the process starts and encodes its bodies)
    cpu_before, clock = cpu_seconds(server_pid), time.monotonic()
    loaded = await measure_b(url, b_key, seconds - 6, b_statuses)
    cpu_share = (cpu_seconds(server_pid) - cpu_before) / (time.monotonic() - clock)
    await asyncio.to_thread(flood.join, seconds + 60)
    if flood.exitcode != 0:
        raise RuntimeError(f"tenant A's flood process failed (exit code {flood.exitcode})")
    a_statuses: dict[str, int] = results.get(timeout=10)
    await asyncio.sleep(5)  # the flood's validations and estimates drain before B measures alone again
    return loaded, cpu_share, a_statuses


async def run(url: str, port: int, seconds: float, stalls: int, scenarios: list[str], rounds: int,
              unloaded_seconds: float, flood_cpus: set[int] | None, server_pid: int) -> dict[str, Any]:
    """Per scenario, ``rounds`` times: B alone for ``unloaded_seconds``, then B under A's flood. The ratios compare
    the pooled samples of those rounds, so the baseline is measured in the same minutes as the load (on a shared
    machine the unloaded p99 alone drifts by 2-3x within an hour)."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        keys = {}
        for name in ("tenant-a", "tenant-b"):
            resp = await c.post("/v1/admin/tenants", json={"name": name}, headers=admin)
            resp.raise_for_status()
            keys[name] = resp.json()["key"]["key"]
        resp = await c.post("/v1/files", files={"file": ("small.jsonl", (LINE * 20).encode())},
                            data={"purpose": "fine-tune"}, headers={"Authorization": f"Bearer {keys['tenant-a']}"})
        resp.raise_for_status()
        file_id = resp.json()["id"]
    await measure_b(url, keys["tenant-b"], 10, Counter())  # warm-up: engine, DB, caches
    b_statuses: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for scenario in scenarios:
        kinds = FLOODS if scenario == "all" else (scenario,)
        alone: dict[str, list[float]] = {"get": [], "chat": []}
        under: dict[str, list[float]] = {"get": [], "chat": []}
        per_round: list[dict[str, float]] = []
        shares: list[float] = []
        alone_shares: list[float] = []
        a_statuses: Counter[str] = Counter()
        for _ in range(rounds):
            cpu_before, clock = cpu_seconds(server_pid), time.monotonic()
            before = await measure_b(url, keys["tenant-b"], unloaded_seconds, b_statuses)
            alone_shares.append((cpu_seconds(server_pid) - cpu_before) / (time.monotonic() - clock))
            loaded, share, statuses = await flood_round(url, port, keys["tenant-a"], file_id, seconds, stalls, kinds,
                                                        flood_cpus, server_pid, keys["tenant-b"], b_statuses)
            this_round = summary(before, loaded)
            per_round.append({what: this_round[what]["p99_ratio"] for what in ("get", "chat")})
            shares.append(share)
            a_statuses.update(statuses)
            for what in ("get", "chat"):
                alone[what] += before[what]
                under[what] += loaded[what]
        out[f"A floods: {scenario}"] = {
            "unloaded": {what: percentiles(alone[what]) for what in ("get", "chat")} | {
                "server CPU share": round(statistics.fmean(alone_shares), 2)},
            **summary(alone, under),
            "p99 ratio per round": {what: [r[what] for r in per_round] for what in ("get", "chat")},
            "server CPU share": round(statistics.fmean(shares), 2), "A": dict(sorted(a_statuses.items()))}
    out["B statuses"] = dict(sorted(b_statuses.items()))
    return out


def table(result: dict[str, Any]) -> str:
    """The ratios as one line per scenario (the JSON above has the milliseconds and status codes)."""
    lines = ["scenario | GET p99 ratio (per round) | chat p99 ratio (per round) | target <= 3"]
    for name, row in result.items():
        if name.startswith("A floods: "):
            rounds = row["p99 ratio per round"]
            lines.append(f"{name[10:]} | {row['get']['p99_ratio']} ({', '.join(map(str, rounds['get']))}) | "
                         f"{row['chat']['p99_ratio']} ({', '.join(map(str, rounds['chat']))})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0, help="how long tenant A floods, per scenario")
    parser.add_argument("--stalls", type=int, default=16, help="A's stalled upload connections")
    parser.add_argument("--scenarios", default="all," + ",".join(FLOODS),
                        help="what A floods with, one scenario each: all, or one of "
                        + ", ".join(FLOODS + EXTRA))
    parser.add_argument("--rounds", type=int, default=3,
                        help="per scenario: this many times B alone, then B under the flood (ratios of the pooled "
                        "samples)")
    parser.add_argument("--unloaded-seconds", type=float, default=12.0, help="B alone, per round")
    parser.add_argument("--flood-cpus", default="last", choices=("last", "shared"),
                        help="pin A's flood client to the last CPU, the server and B to the others (default), or "
                        "share every CPU")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seconds <= 6 or args.rounds < 1 or args.unloaded_seconds <= 0:
        parser.error("--seconds must exceed 6 (B measures its middle, after 4 s of build-up), --rounds be at least 1 "
                     "and --unloaded-seconds positive")
    if args.serve is not None:
        serve(args.serve, args.model_dir)
        return
    from qwenvl_core.models.qwen_vl.materialize import write_random_model

    server_cpus, flood_cpus = cpu_layout(args.flood_cpus)
    if server_cpus is not None:
        os.sched_setaffinity(0, server_cpus)  # B's client here, and the server subprocess (it inherits the mask)
    with tempfile.TemporaryDirectory(prefix="qwenvl-isolation-") as tmp:
        model_dir = write_random_model(Path(tmp) / BASE, preset="qwen-vl-tiny", seed=0)
        proc, url = start_server(Path(tmp), model_dir)
        try:
            httpx.get(f"{url}/ready", timeout=60).raise_for_status()
            result = {"cpus": {"server and B": sorted(server_cpus) if server_cpus else "all",
                               "A's flood client": sorted(flood_cpus) if flood_cpus else "all"}}
            result |= asyncio.run(run(url, int(url.rsplit(":", 1)[1]), args.seconds, args.stalls,
                                      args.scenarios.split(","), args.rounds, args.unloaded_seconds,
                                      flood_cpus, proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the API and its validation / estimate workers
            proc.wait()
    print(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
