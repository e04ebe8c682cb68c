"""The serving engine in a process of its own: a model replica's event loop, with its transport's work per streamed
item (Ray Serve's), in the replica's process; the engine's model thread in a child that shares no GIL with them.

Why: a Python process runs one thread at a time. The model thread gives the GIL up around every torch call and
must take it back after; while the replica's loop is busy (every item a Serve stream sends costs ~0.6 ms of CPU
here, and 64 streams send more than a thousand a second), each take-back can wait for the loop's thread, and a
decode step makes dozens of them (docs/benchmarks.md, "The engine in a process of its own"). vLLM's engine core
runs apart from its API server for the same reason.

The same holds for preparing requests (the chat template, the tokenizer, image decoding and resizing: Python that
holds the GIL for tens of ms a photo), so the replica prepares them and the child gets them ready to queue.

This module owns
- ``EngineProcess``: the replica's side. It starts the child (``python -m qwenvl_core.serving.engine_process``, one
  end of a socket pair inherited), sends it the model directory and ``EngineConfig``, loads the processor, and
  waits until the child's ``ServingEngine`` is loaded (or raises its error). ``stream`` and ``generate`` behave as
  ``ServingEngine``'s (``read_events``: the same coalescing, a request's error before its first event): a request is
  prepared in this process's pool (``preparation.RequestPreparer``) and sent as a ``PreparedRequest``, its pixel
  tensors by value (``tensor_pickle``). Adapter loads, evictions, stats and metrics are calls the child answers.
  One reader thread takes the child's messages: a step's events come as one message and go to the streams' event
  loops with ``deliver``. ``alive`` turns False when the child or its model thread ends; every request in flight
  then gets ``EngineFault`` and the replica's health check fails.
- the child (``_Child``): the ``ServingEngine`` and an asyncio loop that reads the replica's messages. Each prepared
  request is queued with ``ServingEngine.submit`` (which fetches its adapter) and a ``PipeOutlet``: the model thread
  sends a step's events for the replica in one message. An ``end`` from the replica abandons a request it stopped
  reading. The child exits when the replica closes it, or when its end of the socket closes (the replica's process
  ended, even killed).

Messages are tuples pickled by ``multiprocessing.connection`` (a prepared request by ``tensor_pickle``); both ends are
this package's code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import itertools
import logging
import os
import pickle
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from qwenvl_core.models.registry import detect_family
from qwenvl_core.serving import tensor_pickle
from qwenvl_core.serving.engine import (
    EngineConfig,
    EngineEvent,
    EngineFault,
    EngineRequest,
    EngineResult,
    EngineStopped,
    Outlet,
    ServingEngine,
    deliver,
    read_events,
    whole_result,
)
from qwenvl_core.serving.preparation import PreparedRequest, RequestPreparer

log = logging.getLogger(__name__)

# What the child answers when asked (``EngineProcess._call``): ``ServingEngine`` methods of these names
CALLS = frozenset({"load_adapter", "evict_adapter", "unload_adapter", "replica_stats", "metrics_text"})
START_POLL_S = 1.0  # how often the replica checks that a child still loading its model is alive
WATCH_S = 0.5  # how often the child checks its engine (``ServingEngine.problem``)
# The longest the replica waits for the child's answer to a quick call (stats, metrics, eviction): a child that does
# not answer (stopped, or its loop stuck) must not pile up the replica's threads that wait, one per metrics scrape.
# Adapter loads (downloads from S3) wait as long as they take.
CALL_TIMEOUT_S = 30.0


class EngineProcess:
    """A ``ServingEngine`` run in a child process, seen from the replica (see the module docstring)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, dtype: str | None = None,
                 metrics: bool = True) -> None:
        """Start the child and wait until its engine is loaded; its error (e.g. a broken model directory) is
        raised here."""
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "qwenvl_core.serving.engine_process",
                                       str(theirs.fileno())], pass_fds=[theirs.fileno()], env=child_environment())
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._outlets: dict[int, Outlet] = {}
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._ids = itertools.count()
        self._ended: str | None = None  # why the child can no longer serve (None: it can)
        self._closing = False
        self._send(("start", str(model_dir), config, dtype, metrics))
        try:
            family = detect_family(model_dir)
            processor = family.load_processor(model_dir)  # while the child loads the model
            self.info: dict[str, Any] = self._await_start()
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        resolved = EngineConfig(**self.info["config"])  # its device-dependent defaults filled in by the child
        self.preparer = RequestPreparer(processor, family, resolved, pixel_dtype=self.info["pixel_dtype"])
        self._pool = concurrent.futures.ThreadPoolExecutor(resolved.preprocess_threads, thread_name_prefix="qwenvl-prep")
        self._reader = threading.Thread(target=self._read, name="qwenvl-engine-reader", daemon=True)
        self._reader.start()
        log.info("engine process %d serves %s on %s (%d KV slots)", self._proc.pid, model_dir, self.info["device"],
                 self.info["slots"])

    # ----- lifecycle ------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """Why the engine cannot serve (None: it can): the child ended, or told why it cannot (``ServingEngine.
        problem``: its model thread ended or is stuck in a step)."""
        if self._ended is not None:
            return self._ended
        if self._proc.poll() is not None:
            return f"the engine process exited with code {self._proc.returncode}"
        return None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        """Stop the child (requests in flight get ``EngineStopped``) and wait for it; kill it if it does not end."""
        self._closing = True
        if self._proc.poll() is None:
            self._send(("close",))
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("the engine process %d did not stop within 30 s: killed", self._proc.pid)
                self._kill()
        self._conn.close()
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._end("the serving engine stopped", EngineStopped)

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.wait()

    def _await_start(self) -> dict[str, Any]:
        while not self._conn.poll(START_POLL_S) and self._proc.poll() is None:
            pass
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):  # it ended without a word (killed, or failed before our code ran)
            raise RuntimeError(f"the engine process exited with code {self._proc.wait()} while loading the model "
                               "(its log has the cause)") from None
        if kind == "failed":
            raise value
        return value

    # ----- requests -------------------------------------------------------------------------------------------
    async def stream(self, request: EngineRequest, *, coalesce: float | None = None) -> AsyncIterator[EngineEvent]:
        """As ``ServingEngine.stream``: the request is prepared here (this process's preprocessing pool), then runs
        in the child; its events come as they are made."""
        if self._ended is not None:
            raise EngineStopped(self._ended)
        rid, arrived = next(self._ids), time.perf_counter()
        queue: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._outlets[rid] = Outlet(loop, queue)
        try:
            await loop.run_in_executor(self._pool, self._prepare_and_submit, rid, request, arrived)
            async for event in read_events(queue, coalesce):
                yield event
        finally:
            if self._outlets.pop(rid, None) is not None:
                self._send(("end", rid))  # finished or abandoned: the child forgets it (cancels it if running)

    def _prepare_and_submit(self, rid: int, request: EngineRequest, arrived: float) -> None:
        """In the preprocessing pool: prepare ``request`` and send it to the child, unless its stream ended
        meanwhile (the stream's ``end`` then goes after it: both are sent holding the send lock)."""
        try:
            prepared = self.preparer.prepare(request)
        except Exception:
            self._outlets.pop(rid, None)  # never sent: the child has nothing to end
            self._send(("refused", request.adapter_id))  # counted in the child's metrics
            raise
        message = tensor_pickle.dumps(("submit", rid, prepared, arrived))
        try:
            with self._send_lock:
                if rid not in self._outlets:
                    return
                self._conn.send_bytes(message)
        except (OSError, ValueError):
            raise EngineStopped(self._ended or "the serving engine stopped") from None

    async def generate(self, request: EngineRequest) -> EngineResult:
        """Run ``request`` to completion."""
        return await whole_result(self.stream(request, coalesce=0))

    # ----- calls the child answers ----------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, locator: str) -> None:
        self._call("load_adapter", adapter_id, locator, patient=True)

    def evict_adapter(self, adapter_id: str) -> bool:
        return self._call("evict_adapter", adapter_id)

    def unload_adapter(self, adapter_id: str) -> None:
        """Sent without waiting for the answer, from a thread of its own: Serve's multiplexing calls it from a
        finalizer, which may run in a thread that is inside ``_send`` already (holding its lock)."""
        threading.Thread(target=self._send, args=(("call", None, "unload_adapter", (adapter_id,)),),
                         name="qwenvl-engine-unload", daemon=True).start()

    def replica_stats(self) -> dict[str, Any]:
        return self._call("replica_stats")

    def metrics_text(self) -> bytes:
        return self._call("metrics_text")

    def _call(self, name: str, *args: Any, patient: bool = False) -> Any:
        """The child's answer to ``name(*args)``; ``TimeoutError`` when it gives none within ``CALL_TIMEOUT_S``
        (``patient``: no limit)."""
        timeout = None if patient else CALL_TIMEOUT_S
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        cid = next(self._ids)
        self._calls[cid] = future
        if not self._send(("call", cid, name, args)):
            self._calls.pop(cid, None)
            raise EngineStopped(self._ended or "the serving engine stopped")
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self._calls.pop(cid, None)
            raise TimeoutError(f"the engine process did not answer {name} within {timeout:g} s") from None

    # ----- the pipe -------------------------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> bool:
        """False when the child is gone."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # a broken pipe, or our end already closed
            return False

    def _read(self) -> None:
        """The reader thread: the child's events to their streams, its answers to their calls, until it ends."""
        reason = "the model server failed (its engine process ended); retry shortly"
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "events":
                    deliver([(outlet, item) for rid, item in message[1]
                             if (outlet := self._outlets.get(rid)) is not None])
                elif kind == "reply":
                    _, cid, ok, value = message
                    future = self._calls.pop(cid, None)
                    if future is not None and ok:
                        future.set_result(value)
                    elif future is not None:
                        future.set_exception(value)
                elif kind == "stopped":  # its model thread ended or is stuck: we refuse new requests
                    reason = message[1]
                    self._ended = reason
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading the engine process's messages failed")
        self._end("the serving engine stopped" if self._closing else reason,
                  EngineStopped if self._closing else EngineFault)

    def _end(self, reason: str, error: type[Exception]) -> None:
        """No more answers will come: every stream and call still waiting gets ``error``."""
        if self._ended is None:
            self._ended = reason
        for outlet in list(self._outlets.values()):
            outlet(error(reason))
        for cid in list(self._calls):
            future = self._calls.pop(cid, None)
            if future is not None and not future.done():
                future.set_exception(error(reason))


def child_environment() -> dict[str, str]:
    """The child's environment: this process's (the GPUs Ray made visible, storage credentials), with the folder
    this package was imported from first on ``PYTHONPATH`` unless it is a site-packages folder the child finds by
    itself (e.g. a Ray ``working_dir`` or ``py_modules`` copy, which only Ray's workers have on their path; a
    site-packages folder placed there would go before the standard library)."""
    root = str(Path(__file__).resolve().parents[2])
    sites = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    paths = [p for p in (None if root in sites else root, os.environ.get("PYTHONPATH")) if p]
    return {**os.environ, **({"PYTHONPATH": os.pathsep.join(paths)} if paths else {})}


class _Pipe:
    """The child's end of the socket: messages to the replica from any thread, one at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self._lock = conn, threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self.conn.send(message)
        except (OSError, ValueError):  # the replica is gone; the loop sees the closed socket and ends the child
            pass


class PipeOutlet:
    """Where a request's events go in the child: the replica, over the pipe (its ``channel``); ``deliver`` sends a
    step's events in one message (``hand_over``)."""

    __slots__ = ("channel", "rid")

    def __init__(self, pipe: _Pipe, rid: int) -> None:
        self.channel, self.rid = pipe, rid

    def __call__(self, item: EngineEvent | BaseException) -> None:
        self.channel.send(("events", [(self.rid, portable(item))]))

    @staticmethod
    def hand_over(pipe: _Pipe, items: list[tuple[PipeOutlet, EngineEvent]]) -> None:
        pipe.send(("events", [(outlet.rid, event) for outlet, event in items]))


def portable(item: Any) -> Any:
    """``item`` as it can cross to the replica: an exception that does not survive pickling (its class takes other
    arguments than its message) becomes an ``EngineFault`` naming it."""
    if not isinstance(item, BaseException):
        return item
    try:
        pickle.loads(pickle.dumps(item))
        return item
    except Exception:
        return EngineFault(f"{type(item).__name__}: {item}")


class _Child:
    """The child's side: its engine and the loop that serves the replica's messages."""

    def __init__(self, engine: ServingEngine, conn: Connection) -> None:
        self.engine, self.conn, self.pipe = engine, conn, _Pipe(conn)
        self._seqs: dict[int, Any] = {}  # the replica's request id -> the engine's sequence
        self._preparing: set[int] = set()
        self._ended: set[int] = set()  # ended by the replica while still being prepared
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._readable)
        watch = loop.create_task(self._watch_engine())
        try:
            await self._done
        finally:
            loop.remove_reader(self.conn.fileno())
            watch.cancel()

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):  # the replica is gone
            self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            self._preparing.add(message[1])
            self._spawn(self._submit(message[1], message[2], message[3]))
        elif kind == "refused":  # a request its replica refused while preparing it
            self.engine.count_request(message[1], "error")
        elif kind == "end":
            seq = self._seqs.pop(message[1], None)
            if seq is not None:
                self.engine.abandon(seq)
            elif message[1] in self._preparing:
                self._ended.add(message[1])
        elif kind == "call":
            self._spawn(self._answer(message[1], message[2], message[3]))
        elif kind == "close":
            self._finish()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, rid: int, prepared: PreparedRequest, arrived: float) -> None:
        try:
            seq = await self.engine.submit(prepared, PipeOutlet(self.pipe, rid), arrived)
        except Exception as exc:
            self.pipe.send(("events", [(rid, portable(exc))]))
            return
        finally:
            self._preparing.discard(rid)
            ended = rid in self._ended
            self._ended.discard(rid)
        if ended:
            self.engine.abandon(seq)
        else:
            self._seqs[rid] = seq

    async def _answer(self, cid: int | None, name: str, args: tuple[Any, ...]) -> None:
        try:
            if name not in CALLS:
                raise ValueError(f"the engine process has no call {name!r}")
            value, ok = await asyncio.to_thread(getattr(self.engine, name), *args), True
        except Exception as exc:
            value, ok = portable(exc), False
        if cid is not None:
            self.pipe.send(("reply", cid, ok, value))
        elif not ok:
            log.warning("%s%r failed in the engine process: %s", name, args, value)

    async def _watch_engine(self) -> None:
        """Tell the replica once the engine cannot serve (its health check then fails and Serve replaces it)."""
        while (problem := self.engine.problem()) is None:
            await asyncio.sleep(WATCH_S)
        self.pipe.send(("stopped", f"the model server failed and is being replaced ({problem})"))


def _serve(conn: Connection) -> None:
    """The child's body: load the engine, say ready (or why not), serve until closed."""
    _, model_dir, config, dtype, with_metrics = conn.recv()
    try:
        metrics = None
        if with_metrics:
            from prometheus_client import CollectorRegistry

            from qwenvl_core.serving.metrics import ServingMetrics

            metrics = ServingMetrics(CollectorRegistry())
        engine = ServingEngine.from_model_dir(model_dir, config, metrics=metrics,
                                              dtype=getattr(torch, dtype) if dtype else None)
        engine.start()
    except Exception as exc:
        log.exception("the engine process could not load %s", model_dir)
        conn.send(("failed", portable(exc)))
        return
    gc.collect()
    gc.freeze()  # the loaded libraries and model out of the collector's walks (what Ray Serve does for a replica)
    conn.send(("ready", {"pid": os.getpid(), "device": str(engine.device), "slots": engine.slots,
                         "config": dataclasses.asdict(engine.config), "pixel_dtype": engine.preparer.pixel_dtype}))
    try:
        asyncio.run(_Child(engine, conn).run())
    finally:
        engine.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
