"""The serving engine: continuous batching of chat requests for one base model and many LoRA adapters.

This module owns the request lifecycle inside one replica:
1. ``stream(request)`` (async) prepares the request in a thread pool, off the model's critical path
   (``preparation.RequestPreparer``: the cheapest checks first, then the template, the tokens, the images decoded
   and preprocessed; a refused request raises ``RequestError`` naming the field), then fetches its adapter from the
   ``AdapterCache`` (loaded on a miss). The request then holds its ``LoraWeights``: it finishes on the weights it
   started with even if the adapter is evicted or deleted meanwhile. ``submit`` does the same for a caller with a
   receiver of its own, and takes a request prepared elsewhere (``engine_process``: the engine in a child process,
   its requests prepared in the replica's process).
2. One model thread runs the batch loop: waiting requests are prefilled together (left padding, their images,
   their adapters) and join the running batch in the KV slots after its rows (each row stored from column 0, no
   padding columns: ``kv_cache``). A running batch takes them in once a few can join together
   (``admit_ratio``; or after ``admit_hold_steps`` steps): on a GPU a short prefill costs about what a decode step
   does, so one prefill for several joiners instead of one per step;
   every step decodes one token for every running row, with each row's adapter applied in the same forward
   (``lora_batch.GroupedLora``), each row's sampling parameters, stop ids and stop strings (the per-row pieces
   of ``qwenvl_core.generation``). Finished or abandoned rows leave the batch at once.
3. Tokens stream back to each request's asyncio queue as text deltas (text that could still become a stop
   string, or an incomplete UTF-8 character, is held back); the last event carries usage and the grounding
   boxes parsed from the output, in pixels of each input image.

A fault in the model thread fails only the rows it belongs to: a batched forward that raises is re-run row by
row (prefill: each new request alone; decode: each row on its own slice of the KV cache), and a row whose
sampling or text step raises is dropped alone; such a row's request gets ``EngineFault`` (a server-side failure,
never the request's mistake), the others continue; so does a request whose adapter cannot be copied to its
device slot. ``EngineStopped`` is what requests in flight get on close. A fault outside these (an engine bug, a
device that broke) ends the model thread: every request in flight and waiting gets ``EngineFault`` at once, new
ones ``EngineStopped``, and ``alive`` turns False (Serve's health check then replaces the replica). A step that runs
longer than ``stall_timeout_s`` (a device that hangs) makes ``problem()`` say so while it lasts, which fails that
health check too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qwenvl_core.devices import checked_device, default_device, host_to_device
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import (
    FinishReason,
    RowState,
    advance_row,
    left_pad,
    make_rows,
    next_tokens,
)
from qwenvl_core.grounding import PixelObject
from qwenvl_core.models.processing import FamilyProcessor, VisionInputs
from qwenvl_core.models.registry import FamilyName, ModelFamily, detect_family
from qwenvl_core.scratch import ScratchDir
from qwenvl_core.serving.adapter_cache import AdapterCache, AdapterFetcher
from qwenvl_core.serving.adapter_slots import AdapterSlots
from qwenvl_core.serving.decode_graphs import DecodeGraphs, GraphCaptureError, StepShape
from qwenvl_core.serving.fused_siblings import fuse_sibling_linears
from qwenvl_core.serving.kv_cache import SlotKVCache, cache_shape_of
from qwenvl_core.serving.lora_batch import (
    AdapterError,
    GroupedLora,
    LoraPlan,
    LoraWeights,
    load_lora_weights,
    lora_targets,
)
from qwenvl_core.serving.metrics import ServingMetrics, adapter_label
from qwenvl_core.serving.preparation import (
    EngineRequest,
    PreparedRequest,
    RequestPreparer,
    vision_input_dtype,
)
from qwenvl_core.serving.vision_adapters import VisionAdapters, VisionWeights, tower_order
from qwenvl_core.vocabulary import TokenLogprob, describe_logprobs, row_vocabulary, vocabulary

log = logging.getLogger(__name__)


# CUDA's errors other than out-of-memory (an illegal address, a device-side assert, a launch failure) are sticky:
# the process's device context is unusable from then on, so they fail the model thread instead of one request
# (out-of-memory, ``torch.OutOfMemoryError``, is not one of them and stays the request's own fault).
DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(torch, "AcceleratorError", None),) if error is not None)


class EngineFault(RuntimeError):
    """A request failed inside the model thread: a server-side fault (HTTP 500), not the request's mistake."""


class EngineStopped(RuntimeError):
    """The engine stopped while the request was queued or running (HTTP 503)."""


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting for a slot (HTTP 429, retry after ``retry_after_s``)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.retry_after_s)


class EngineTimeout(RuntimeError):
    """The request did not finish within ``EngineConfig.request_timeout_s`` (HTTP 504)."""


@dataclass(frozen=True)
class EngineConfig:
    """Batching, cache and limit settings of one engine (one replica)."""

    # Requests decoded together, at most (the KV cache budget may hold fewer; requests beyond wait). None: 64 on a
    # GPU, 16 on the CPU. A decode step reads every weight whatever its rows: on a GPU its matmuls stay bound by
    # that read up to a few hundred rows in bf16, so rows up to 64 add little more than their own attention, and
    # fewer requests queue behind a running batch (the H200's TTFT at 32 concurrent requests and 16 rows was
    # mostly waiting, docs/benchmarks.md); the CPU is compute-bound, a row more is a row's work more.
    max_batch_size: int | None = None
    max_adapters: int = 8  # adapters kept loaded in host memory (``AdapterCache``), least recently used evicted
    max_adapter_bytes: int | None = None
    # Adapters resident on the device at once (``AdapterSlots``); a request whose adapter finds every slot pinned by
    # running rows waits for one.
    adapter_slots: int = 8
    max_lora_rank: int = 64
    # How a decode step applies several adapters (``lora_batch``): "dense", every slot's ranks in one pair of
    # matmuls, a mask keeping each row's own (fewest kernels: what a decode step on a GPU is bound by); "grouped",
    # the rows gathered per slot into batched matmuls (fewest multiply-adds: what a CPU is bound by); "auto": dense
    # on a GPU, grouped elsewhere.
    lora_decode: Literal["auto", "dense", "grouped"] = "auto"
    # The base model's sibling layers (``fused_siblings``: q / k / v, gate / up, v1's w1 / w2) as one matmul per
    # group: "on" (3 launches fewer a Qwen2/2.5-VL layer, 1 a v1 layer: what a decode step on a GPU is bound by),
    # "off" (on this project's CPU the fused matmuls ran slower: Qwen2.5-VL's decode step 2-5%), "auto": on on a
    # GPU, off elsewhere.
    fuse_siblings: Literal["auto", "on", "off"] = "auto"
    # Device memory for copies of adapters' vision-tower weights (a trained merger / Resampler, encoder LoRA),
    # least recently used dropped beyond (``vision_adapters.DeviceCopies``); reserved on a GPU before the KV cache
    # is sized from free memory. Unused on the CPU, where the host weights serve directly.
    vision_adapter_bytes: int = 1 << 30
    max_total_tokens: int = 2048
    max_images_per_request: int = 16
    max_image_bytes: int = 20 * 1024 * 1024  # one encoded image (file, bytes or data URL payload)
    max_image_bytes_total: int = 50 * 1024 * 1024  # all encoded images of one request together
    preprocess_threads: int = 2
    adapter_cache_dir: str | None = None  # S3 adapters' downloads, kept; None: scratch removed on close
    # "4bit": the language model's linears (not lm_head) become bitsandbytes NF4 ``Linear4bit``, exactly as
    # Q-LoRA training quantizes them (``training.lora.quantize_language_model``): Q-LoRA adapters are served on
    # the base they were trained on. "none": the base as loaded (Q-LoRA adapters then run on the unquantized base).
    quantization: Literal["none", "4bit"] = "none"
    # Where the model, its KV cache, the adapters and the sampling generators live: "cuda" (or "cuda:N") on a GPU
    # replica (the Serve deployment sets it when Ray gives the replica a GPU), "cpu" otherwise; None: this
    # process's GPU when one is visible, else the CPU (``devices.default_device``, the trainer's default too).
    device: str | None = None
    # The KV cache: one preallocated slot of ``max_total_tokens`` per running request (``kv_cache``). Its size:
    # ``kv_cache_bytes`` when set; else on a GPU ``kv_cache_memory_fraction`` of the memory free after loading
    # the model and allocating the adapter slots (``adapter_slots``), less ``vision_adapter_bytes``; else (CPU)
    # ``max_batch_size`` slots. The slots it holds (at most ``max_batch_size``) bound the running batch; requests
    # beyond wait.
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.85
    # Requests waiting for a slot; beyond this the engine refuses new ones (``EngineOverloaded``: HTTP 429).
    max_waiting: int = 256
    # A request not finished this many seconds after it arrived fails (``EngineTimeout``: HTTP 504); None: never.
    request_timeout_s: float | None = 600.0
    # A prompt longer than this is prefilled in chunks of about this many tokens (an image span is never split),
    # one chunk per engine step between the running rows' decode steps, so their streams do not stall for a whole
    # long prefill; shorter prompts joining in one step share one prefill forward of at most this many tokens.
    # 0: every prompt whole, all that join in one forward. None: 2,048 on a GPU (a forward of fewer tokens reads
    # every weight for little work: a 7B bf16 model on an H100 is bound by memory below ~1-2k tokens, and a
    # replica's eager forward by launches, so small prefills cost about a whole forward each), 512 on the CPU
    # (compute-bound: the running streams' stall grows with every token; docs/benchmarks.md, "Chunked prefill,
    # measured per token").
    prefill_chunk_tokens: int | None = None
    # A running batch takes in waiting requests when at least ``admit_ratio`` of them per running row can join (so
    # several share one prefill forward: on a GPU a short prefill costs about a decode step, whatever its rows),
    # or once they have been held back ``admit_hold_steps`` decode steps; a batch not running takes them at once.
    # 0: every step takes in whatever fits.
    admit_ratio: float = 0.2
    admit_hold_steps: int = 2
    # Decode steps of fixed shapes (``decode_graphs``; every family, a 4-bit base too): "cuda", replayed from
    # CUDA graphs (one launch a step instead of ~30 a layer; captured as steps need them); "static", the same fixed
    # shapes run without graphs (tests: it must give what "off" gives); "off", every step shaped by its rows. Not
    # yet the default: unmeasured on a GPU.
    decode_graphs: Literal["off", "cuda", "static"] = "off"
    decode_graph_attend_step: int = 256  # attended keys rounded up to a multiple of this (fewer graphs, more masked)
    # One engine step (a forward and its rows' work) running longer than this makes the engine unhealthy
    # (``problem``): a device that hangs holds its requests, and their own timeouts, which the model thread checks,
    # forever; the replica's health check then fails and Serve replaces it. None: never.
    stall_timeout_s: float | None = 300.0


PREFILL_TOKENS_GPU, PREFILL_TOKENS_CPU = 2048, 512  # ``EngineConfig.prefill_chunk_tokens`` None
BATCH_GPU, BATCH_CPU = 64, 16  # ``EngineConfig.max_batch_size`` None


def resolve_config(config: EngineConfig, device: torch.device) -> EngineConfig:
    """``config`` with its device-dependent defaults filled in (``prefill_chunk_tokens``, ``max_batch_size``:
    None)."""
    cpu = device.type == "cpu"
    defaults = {"prefill_chunk_tokens": PREFILL_TOKENS_CPU if cpu else PREFILL_TOKENS_GPU,
                "max_batch_size": BATCH_CPU if cpu else BATCH_GPU}
    unset = {name: value for name, value in defaults.items() if getattr(config, name) is None}
    return dataclasses.replace(config, **unset) if unset else config


@dataclass
class ImageBoxes:
    """Grounding boxes of the output in pixel coordinates of input image ``image_index``."""

    image_index: int
    width: int
    height: int
    objects: list[PixelObject]


@dataclass
class EngineEvent:
    """A streamed piece of output; the last one has ``finish_reason``, usage and grounding set. ``logprobs``: one
    record per id of ``token_ids`` when the request's ``SamplingParams.logprobs`` is set."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    grounding: list[ImageBoxes] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class EngineResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    grounding: list[ImageBoxes]


@dataclass
class _Sequence:
    request: EngineRequest
    prompt_ids: list[int]
    images: list[VisionInputs]  # each image's model input, in prompt order
    image_sizes: list[tuple[int, int]]
    adapter: LoraWeights | None
    state: RowState
    arrived: float
    emit: Callable[[EngineEvent | BaseException], None] = lambda _item: None
    itl: Any = None  # its inter-token latency series (metrics), looked up at its first token
    sent_chars: int = 0
    sent_tokens: int = 0
    generated: int = 0
    last_token_at: float | None = None
    cancelled: bool = False
    failed: bool = False  # got an error from the model thread; leaves the batch at the next compaction
    adapter_slot: int = 0  # its adapter's device slot while running (0: the base model)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, first image, images)
    chunks_done: int = 0
    positions: torch.Tensor | None = None  # a chunked prompt's rotary positions, computed at its first chunk
    offset: torch.Tensor | None = None


@dataclass
class _Batch:
    seqs: list[_Sequence]  # row i holds KV slot i
    plan: LoraPlan | None


class _RowTensors:
    """Per-slot numbers the model needs every step, kept on the device (no host round trip per step): each row's
    next text position, its rotary offset (M-RoPE families) and its prompt length (v1's dynamic NTK)."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.text_pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.offset = torch.zeros(slots, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.adapter_slot = torch.zeros(slots, dtype=torch.long, device=device)

    def move(self, source: int, target: int) -> None:
        for t in (self.text_pos, self.offset, self.prompt_len, self.adapter_slot):
            t[target] = t[source]


@dataclass
class EngineStats:
    forwards: int = 0
    prefills: int = 0
    max_rows: int = 0
    max_adapters_in_forward: int = 0
    kv_slots: int = 0
    kv_cache_bytes: int = 0
    adapter_slot_bytes: int = 0


def safe_text_end(text: str, stop_strings: Sequence[str]) -> int:
    """How much of ``text`` may be sent: not a trailing partial character, not a possible stop-string start."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return end


class ServingEngine:
    """Continuous batching over one base model with per-row LoRA adapters (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: FamilyProcessor,
        family: ModelFamily,
        config: EngineConfig = EngineConfig(),
        metrics: ServingMetrics | None = None,
    ) -> None:
        _check_choices(config)  # before anything below changes the model in place (fused siblings, hooks)
        lm_dtype, lm_device = _lm_dtype_device(model)
        config = resolve_config(config, lm_device)
        self.model, self.processor, self.family, self.config = model.eval(), processor, family, config
        self.metrics = metrics
        self.lora = GroupedLora(model)
        self.vision = VisionAdapters(model, family, max_device_bytes=config.vision_adapter_bytes)
        if config.fuse_siblings == "on" or (config.fuse_siblings == "auto" and lm_device.type == "cuda"):
            fuse_sibling_linears(model, family)
        # the adapter slots before the KV cache: a cache sized from free GPU memory must leave them theirs
        dense = config.lora_decode == "dense" or (config.lora_decode == "auto" and lm_device.type == "cuda")
        self.adapter_slots = AdapterSlots(config.adapter_slots, config.max_lora_rank, lora_targets(model, family),
                                          lm_device, lm_dtype, dense_decode=dense, siblings=family.lora_siblings())
        # downloaded S3 adapters: the configured folder (kept), or scratch removed on close or by the next sweep
        self._scratch: ScratchDir | None = None
        if config.adapter_cache_dir:
            cache_dir = Path(config.adapter_cache_dir)
        else:
            self._scratch = ScratchDir("adapters")
            cache_dir = self._scratch.path
        self.cache = AdapterCache(
            lambda local, adapter_id: load_lora_weights(local, adapter_id, model, family,
                                                         max_rank=config.max_lora_rank, device="cpu"),  # host tier
                                                         # (pinned on a GPU); AdapterSlots copies to the device
            AdapterFetcher(cache_dir),
            max_adapters=config.max_adapters,
            max_bytes=config.max_adapter_bytes,
            itemsize=next(model.parameters()).element_size(),
            observer=metrics,
        )
        self.kv = _allocate_cache(model, config)
        self._graphs = _decode_graphs(model, family, config, self.kv, self.lora, self.adapter_slots)
        self.slots = self.kv.slots
        self._rows = _RowTensors(self.slots, self.kv.device)
        self.stats = EngineStats(kv_slots=self.slots, kv_cache_bytes=self.kv.nbytes,
                                 adapter_slot_bytes=self.adapter_slots.nbytes)
        log.info("serving engine on %s: KV cache of %d requests x %d tokens (%.2f GiB), %d adapter slots of rank "
                 "%d (%.2f GiB)", self.kv.device, self.slots, config.max_total_tokens, self.kv.nbytes / 2**30,
                 config.adapter_slots, config.max_lora_rank, self.adapter_slots.nbytes / 2**30)
        self._pad_id = processor.pad_token_id
        self.preparer = RequestPreparer(processor, family, config, pixel_dtype=vision_input_dtype(model, family))
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="qwenvl-prep")
        self._waiting: deque[_Sequence] = deque()
        self._held = 0  # consecutive decode steps that held waiting requests back (admit_ratio)
        self._batch: _Batch | None = None
        self._chunking: _Sequence | None = None  # the long prompt being prefilled chunk by chunk (top KV slot)
        self._cond = threading.Condition()
        self._stopping = False
        self._broken = False  # the model thread failed: new requests are refused (``EngineStopped``)
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # when the step the model thread is in began (None: between steps)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        config: EngineConfig = EngineConfig(),
        metrics: ServingMetrics | None = None,
        dtype: torch.dtype | None = None,
    ) -> ServingEngine:
        """Load the base model and processor of a local model directory (LM in 4-bit if ``config.quantization``)."""
        device = default_device() if config.device is None else checked_device(config.device, "EngineConfig.device")
        family = detect_family(model_dir)
        model = family.load_model(model_dir, dtype=dtype, device=device)
        if config.quantization == "4bit":
            from qwenvl_core.training.lora import quantize_language_model

            quantize_language_model(model, family, dtype or next(model.parameters()).dtype)
        elif config.quantization != "none":
            raise QwenVLError(f"quantization {config.quantization!r}: expected 'none' or '4bit'")
        return cls(model, family.load_processor(model_dir), family, config, metrics)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on (logits, caches and generators follow it)."""
        return next(self.model.parameters()).device

    # ----- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """Why the engine cannot serve (None: it can): its model thread ended, or is stuck in one step for longer
        than ``stall_timeout_s``."""
        if self._thread is None or not self._thread.is_alive():
            return "the model thread is not running"
        started, limit = self._step_started, self.config.stall_timeout_s
        if started is not None and limit is not None and time.monotonic() - started > limit:
            return f"one step of the model thread has run for over {limit:g} s (a device that hangs?)"
        return None

    def close(self) -> None:
        """Stop the model thread (requests in flight get an error) and the preprocessing pool."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.lora.remove_hooks()
        self.vision.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def evict_adapter(self, adapter_id: str) -> bool:
        """Drop a deleted adapter: from the cache, its downloaded files and its metrics (requests in flight keep their
        weights)."""
        evicted = self.cache.evict(adapter_id, forget_files=True)
        if self.metrics is not None:
            self.metrics.forget(adapter_id)
        return evicted

    def unload_adapter(self, adapter_id: str) -> bool:
        """Drop an adapter from the host cache but keep its downloaded files (a router moved it elsewhere)."""
        return self.cache.evict(adapter_id, forget_files=False)

    def load_adapter(self, adapter_id: str, locator: str) -> None:
        """Load an adapter into the host cache ahead of its requests (a router sent it here); blocking."""
        self.cache.get(adapter_id, locator)

    def replica_stats(self) -> dict[str, Any]:
        """The adapter cache's contents and counters, the most adapters one forward mixed, and this process's
        garbage collector (objects frozen out of its walks, objects it walks)."""
        stats = self.cache.stats
        return {"cached": self.cache.ids(), "loads": stats.loads, "hits": stats.hits, "evictions": stats.evictions,
                "max_adapters_in_forward": self.stats.max_adapters_in_forward,
                "gc_frozen": gc.get_freeze_count(), "gc_tracked": len(gc.get_objects())}

    def metrics_text(self) -> bytes:
        """The engine's Prometheus metrics (text format; empty without metrics)."""
        return self.metrics.exposition() if self.metrics else b""

    # ----- requests -------------------------------------------------------------------------------------------
    async def stream(self, request: EngineRequest, *, coalesce: float | None = None) -> AsyncIterator[EngineEvent]:
        """Generate for ``request``, yielding text deltas; errors in preparing it raise before the first event.

        ``coalesce`` (seconds): the events ready when the consumer asks for the next come as one (``join_events``),
        and after the first, one comes at most this often (0: as soon as one is ready), the last one without
        waiting; None: every event alone. A consumer slower than the engine gets fewer, larger deltas, none later;
        a Ray Serve stream, whose every item costs ~0.6 ms of CPU, sends fewer items (docs/benchmarks.md)."""
        queue: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        seq = await self.submit(request, Outlet(asyncio.get_running_loop(), queue))
        try:
            async for event in read_events(queue, coalesce):
                yield event
        finally:
            self.abandon(seq)

    async def submit(self, request: EngineRequest | PreparedRequest, emit: Callable[[EngineEvent | BaseException], None],
                     arrived: float | None = None) -> _Sequence:
        """Prepare ``request`` (in the preprocessing pool; a ``PreparedRequest``, prepared in another process, only
        gets its adapter there) and queue it; its events and its error go to ``emit``, called from the model thread
        (``deliver``: an ``Outlet`` or another receiver with a ``channel``). Errors in preparing or queueing it raise
        here. The caller ends it with ``abandon``. ``arrived``: when the request came (``time.perf_counter()`` of
        any process on this machine: one system-wide monotonic clock on Linux); None: now."""
        self.start()
        arrived = time.perf_counter() if arrived is None else arrived
        make = self._sequence if isinstance(request, PreparedRequest) else self._prepare
        try:
            seq = await asyncio.get_running_loop().run_in_executor(self._pool, make, request, arrived)
        except Exception:
            self.count_request(_request_of(request).adapter_id, "error")
            raise
        seq.emit = emit
        with self._cond:
            if self._broken:
                self.count_request(seq.request.adapter_id, "error")
                raise EngineStopped("the model server failed and is being replaced")
            if len(self._waiting) >= self.config.max_waiting:
                self.count_request(seq.request.adapter_id, "rejected")
                raise EngineOverloaded(f"the model server has {len(self._waiting)} requests waiting (the limit); "
                                       "retry later", retry_after_s=1)
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def abandon(self, seq: _Sequence) -> None:
        """The caller no longer reads ``seq``'s events: unless it finished or failed, it is cancelled (it leaves the
        queue or the batch at the model thread's next step, its KV and adapter slots freed)."""
        if not seq.state.done and not seq.failed:
            seq.cancelled = True
            self.count_request(seq.request.adapter_id, "cancelled")

    async def generate(self, request: EngineRequest) -> EngineResult:
        """Run ``request`` to completion."""
        return await whole_result(self.stream(request, coalesce=0))

    def _prepare(self, request: EngineRequest, arrived: float) -> _Sequence:
        """``request`` prepared (``preparation``: its checks, template, tokens and images), then its adapter."""
        return self._sequence(self.preparer.prepare(request), arrived)

    def _sequence(self, prepared: PreparedRequest, arrived: float) -> _Sequence:
        """The engine's sequence of a prepared request: its adapter fetched (loaded on a cache miss) and its sampling
        row made on the device."""
        params = prepared.params
        return _Sequence(prepared.request, prepared.prompt_ids, prepared.images, prepared.image_sizes,
                         self._adapter(prepared.request),
                         make_rows(params, 1, self.device, row_vocabulary(params, self.processor))[0],
                         arrived, chunks=prepared.chunks)

    def _adapter(self, request: EngineRequest) -> LoraWeights | None:
        if request.adapter_id is None:
            return None
        if request.adapter_locator is None:
            raise AdapterError(f"adapter {request.adapter_id}: no locator given")
        return self.cache.get(request.adapter_id, request.adapter_locator)

    def count_request(self, adapter_id: str | None, outcome: str) -> None:
        """Count a request's outcome in the metrics (``engine_process``: one its replica refused while preparing)."""
        if self.metrics:
            self.metrics.series(self.metrics.requests, adapter_label(adapter_id), outcome).inc()

    # ----- the model thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        new: list[_Sequence] | None = []
        try:
            while (new := self._take_new()) is not None:
                self._step_started = time.monotonic()
                self._step(new)
                self._step_started = None
                new = []  # hold no request (nor its adapter weights) while waiting for work
        except Exception as exc:  # outside the per-request isolation (an engine bug, a broken device): no request
            # may wait for a thread that is gone; the replica's health check fails and Serve replaces it
            log.error("the serving engine's model thread failed; every request in flight fails", exc_info=exc)
            fault = EngineFault(f"the model server failed ({type(exc).__name__}); retry shortly")
            with self._cond:
                self._broken = True
            for seq in new or []:
                self._fail(seq, fault)
            self._fail_all(fault)
            return
        self._fail_all(EngineStopped("the serving engine stopped"))

    def _take_new(self) -> list[_Sequence] | None:
        """Wait for work; the waiting requests that fit in the batch (None when stopping)."""
        with self._cond:
            while not self._stopping and not self._waiting and self._batch is None and self._chunking is None:
                self._cond.wait()
            if self._stopping:
                return None
            running = len(self._batch.seqs) if self._batch else 0
            joining = min(self.slots - running - (self._chunking is not None), len(self._waiting))
            # (module docstring: fewer, larger prefills); the count restarts whenever nothing is held back
            hold = 0 < joining < self.config.admit_ratio * running and self._held < self.config.admit_hold_steps
            self._held = self._held + 1 if hold else 0
            if hold:
                return []
            new = [self._waiting.popleft() for _ in range(joining)]
            return [s for s in new if not s.cancelled]

    def _expire(self) -> None:
        """Fail the requests (waiting or running) older than ``request_timeout_s``."""
        timeout = self.config.request_timeout_s
        if timeout is None:
            return
        deadline = time.perf_counter() - timeout
        with self._cond:
            expired = [s for s in self._waiting if s.arrived < deadline]
            for seq in expired:
                self._waiting.remove(seq)
        running = (self._batch.seqs if self._batch else []) + ([self._chunking] if self._chunking else [])
        for seq in expired + [s for s in running if s.arrived < deadline and not s.state.done]:
            self._fail(seq, EngineTimeout(f"the request did not finish within {timeout:g} s"))
        self._compact()

    def _step(self, new: list[_Sequence]) -> None:
        self._expire()
        if new:
            self._admit(new)
        if self._chunking is not None:
            self._next_chunk()
        try:
            if self._batch is not None:
                self._decode()
        except Exception as exc:  # not a row's own fault (those are isolated in _decode): the batch fails
            for seq in self._batch.seqs if self._batch else []:
                self._fail(seq, exc)
            self._compact()  # the failed rows leave: their KV slots and adapter slots are freed
        if self.metrics:
            running = len(self._batch.seqs) if self._batch else 0
            self.metrics.running.set(running)
            self.metrics.kv_slots_used.set(running)
            self.metrics.waiting.set(len(self._waiting))
            self.metrics.adapter_slots_pinned.set(self.adapter_slots.in_use)
            self.metrics.adapter_slots_resident.set(self.adapter_slots.resident)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            seqs = list(self._waiting) + (self._batch.seqs if self._batch else []) + \
                ([self._chunking] if self._chunking else [])
            self._waiting.clear()
            self._batch, self._chunking = None, None
        for seq in seqs:
            self._fail(seq, exc)

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        """Fail one request with a server-side error (the cause is logged, not sent); its row leaves the batch.
        A device error (``DEVICE_ERRORS``) is not the request's: it is raised again, so that it ends the model
        thread (``_loop``) and the replica is replaced."""
        if isinstance(exc, DEVICE_ERRORS):
            raise exc
        if seq.failed:
            return
        seq.failed = True
        if not isinstance(exc, EngineFault | EngineStopped | EngineTimeout):
            log.error("request %s failed in the model thread", seq.request.request_id, exc_info=exc)
            what = str(exc) if isinstance(exc, QwenVLError) else type(exc).__name__
            exc = EngineFault(f"generation failed in the model server ({what})")
        self.count_request(seq.request.adapter_id, "error")
        seq.emit(exc)

    def _place_adapters(self, new: list[_Sequence]) -> list[_Sequence]:
        """The new requests whose adapters got a device slot; the others go back to the front of the queue."""
        placed, unplaced = [], []
        for seq in new:
            try:
                slot = 0 if seq.adapter is None else self.adapter_slots.acquire(seq.adapter)
            except Exception as exc:  # copying its adapter to the device failed (e.g. out of memory): it alone
                self._fail(seq, exc)
                continue
            if slot is None:
                unplaced.append(seq)
            else:
                seq.adapter_slot = slot
                placed.append(seq)
        if unplaced:
            with self._cond:
                self._waiting.extendleft(reversed(unplaced))
        return placed

    def _admit(self, new: list[_Sequence]) -> None:
        """Prefill the new requests together; if that raises, each one alone, so a faulty one fails by itself."""
        new = self._split_long(self._place_adapters(new))
        if not new:
            return
        try:
            self._prefill(new)
            return
        except Exception as exc:
            if len(new) == 1:
                self._fail(new[0], exc)
                self._release_unjoined(new)
                return
            group_error = exc
            log.warning("prefill of %d requests failed (%r): prefilling them one by one", len(new), exc)
        for seq in new:
            if seq.failed or seq.cancelled:
                continue
            if seq.generated:  # its first token was already sent: it cannot be prefilled again
                self._fail(seq, group_error)
                continue
            try:
                self._prefill([seq])
            except Exception as exc:
                self._fail(seq, exc)
        self._release_unjoined(new)

    def _split_long(self, new: list[_Sequence]) -> list[_Sequence]:
        """The requests to prefill whole now, together at most ``prefill_chunk_tokens`` tokens (at least one
        request); a long one becomes the chunked prefill (one at a time). The others go back to the front of the
        queue, their adapter slots unpinned: one step's prefill work stays bounded, so running streams do not stall."""
        whole, back, budget = [], [], self.config.prefill_chunk_tokens
        for seq in new:
            if len(seq.chunks) <= 1:
                fits = not budget or not whole or sum(len(s.prompt_ids) for s in whole) + len(seq.prompt_ids) <= budget
                (whole if fits else back).append(seq)
            elif self._chunking is None:
                self._chunking = seq
            else:
                back.append(seq)
        for seq in back:
            self.adapter_slots.release(seq.adapter_slot)
            seq.adapter_slot = 0
        if back:
            with self._cond:
                self._waiting.extendleft(reversed(back))
        return whole

    @torch.inference_mode()
    def _next_chunk(self) -> None:
        """Prefill the next chunk of the long prompt in the top KV slot; after its last chunk the row samples its
        first token and moves into the running batch. A failure (or a cancelled request) ends it alone."""
        seq, slot = self._chunking, self.slots - 1
        assert seq is not None
        try:
            if seq.cancelled or seq.failed:
                raise _Abandoned()
            logits = self._prefill_chunk(seq, slot)
        except Exception as exc:
            self._chunking = None
            self.kv.release(slot)
            self.adapter_slots.release(seq.adapter_slot)
            seq.adapter_slot = 0
            if not isinstance(exc, _Abandoned):
                self._fail(seq, exc)
            return
        if logits is None:
            return
        self._chunking = None
        batch = self._batch
        first = len(batch.seqs) if batch else 0
        self.kv.move(slot, first)
        self._rows.move(slot, first)
        self.stats.prefills += 1
        self._after_step([seq], logits)
        running = (batch.seqs if batch else []) + [seq]
        self._batch = _Batch(running, self._plan(running, 0))
        self._compact()

    def _prefill_chunk(self, seq: _Sequence, slot: int) -> torch.Tensor | None:
        """One chunk of ``seq``'s prompt into KV slot ``slot``: the last position's logits after the last chunk."""
        device, rows, cache = self.device, self._rows, self.kv
        if seq.chunks_done == 0:
            ids = host_to_device([seq.prompt_ids], device, torch.long)
            vision = VisionInputs.concat(seq.images)
            images = {} if vision is None else vision.to(device).as_kwargs()
            seq.positions, seq.offset = self.family.rope_positions(self.model, ids, torch.ones_like(ids), images)
            rows.prompt_len[slot] = len(seq.prompt_ids)
            rows.adapter_slot[slot] = seq.adapter_slot
        start, end, first_image, n_images = seq.chunks[seq.chunks_done]
        vision = VisionInputs.concat(seq.images[first_image : first_image + n_images])
        images = {} if vision is None else vision.to(device).as_kwargs()
        ids = host_to_device([seq.prompt_ids[start:end]], device, torch.long)
        cache.for_chunk(slot, start, end - start)
        chunk_images = ((_tower_weights(seq), part) for part in seq.images[first_image : first_image + n_images])
        try:
            with self.vision.encoding(chunk_images):
                logits = self._forward(ids, cache.chunk_mask(), seq.positions[..., start:end], images,
                                       self.adapter_slots.plan(rows.adapter_slot[slot : slot + 1], [seq.adapter_slot],
                                                               [seq.adapter]),
                                       rows.prompt_len[slot : slot + 1])
        except BaseException:
            cache.abandon()
            raise
        cache.commit()
        seq.chunks_done += 1
        if seq.chunks_done < len(seq.chunks):
            return None
        rows.text_pos[slot], rows.offset[slot] = len(seq.prompt_ids), seq.offset[0]
        return logits

    def _release_unjoined(self, new: list[_Sequence]) -> None:
        """Unpin the adapter slots of new requests that did not join the batch (their prefill failed)."""
        joined = {id(s) for s in self._batch.seqs} if self._batch else set()
        for seq in new:
            if seq.adapter_slot and id(seq) not in joined:
                self.adapter_slots.release(seq.adapter_slot)
                seq.adapter_slot = 0

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Run the new requests' prompts (left padded together) into the slots after the running rows (ordered so
        that each adapter's images are encoded in one pass of the vision tower)."""
        seqs = tower_order(seqs, _tower_weights)
        batch = self._batch
        first = len(batch.seqs) if batch else 0
        device, cache, rows = self.device, self.kv, self._rows
        ids, mask = left_pad([s.prompt_ids for s in seqs], self._pad_id)
        ids, mask = ids.to(device), mask.to(device)
        vision = VisionInputs.concat(part for s in seqs for part in s.images)
        images = {} if vision is None else vision.to(device).as_kwargs()
        positions, offsets = self.family.rope_positions(self.model, ids, mask, images)
        cache.for_prefill(first, [len(s.prompt_ids) for s in seqs])
        new = slice(first, first + len(seqs))
        rows.prompt_len[new] = mask.sum(dim=1)
        rows.adapter_slot[new] = host_to_device([s.adapter_slot for s in seqs], device, torch.long)
        try:
            with self.vision.encoding((_tower_weights(s), part) for s in seqs for part in s.images):
                logits = self._forward(ids, cache.prefill_mask(mask), positions, images, self._plan(seqs, first),
                                       rows.prompt_len[new])
        except BaseException:
            cache.abandon()
            raise
        cache.commit()
        rows.text_pos[new], rows.offset[new] = rows.prompt_len[new], offsets
        self.stats.prefills += 1
        self._after_step(seqs, logits)
        running = (batch.seqs if batch else []) + seqs
        self._batch = _Batch(running, self._plan(running, 0))
        self._compact()

    @torch.inference_mode()
    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        n = len(batch.seqs)
        step_ids = host_to_device([[s.state.tokens[-1]] for s in batch.seqs], self.device, torch.long)
        try:
            logits = self._decode_rows(0, n, step_ids, batch.plan, batch.seqs)
        except Exception as exc:
            if n == 1:
                raise
            log.warning("decode step of %d rows failed (%r): running it row by row", n, exc)
            self._decode_apart(batch, step_ids)
            return
        self._after_step(batch.seqs, logits)
        self._compact()

    def _decode_rows(self, first: int, end: int, step_ids: torch.Tensor, plan: LoraPlan | None,
                     seqs: Sequence[_Sequence] | None = None) -> torch.Tensor:
        """One decode step of the rows in slots ``first .. end - 1``: their next-token logits ``[rows, V]``; the
        whole batch (``seqs``) as a fixed-shape step where ``decode_graphs`` is on and the step fits one."""
        cache, rows, span = self.kv, self._rows, slice(first, end)
        positions = self.family.step_positions(rows.text_pos[span, None], rows.offset[span])
        shape = None
        if self._graphs is not None and seqs is not None:
            shape = self._graphs.shape_for(end, max(cache.lengths[:end]), tuple(plan.stacks) if plan else (),
                                           plan.rank if plan else 0)
        try:
            logits = None
            if shape is not None:
                logits = self._graph_step(shape, end, step_ids, positions, rows.prompt_len[span], plan, seqs)
            if logits is None:
                cache.for_decode(first, end)
                logits = self._forward(step_ids, cache.decode_mask(), positions, {}, plan, rows.prompt_len[span])
        except BaseException:
            cache.abandon()
            raise
        cache.commit()
        rows.text_pos[span] += 1
        return logits

    def _graph_step(self, shape: StepShape, rows: int, step_ids: torch.Tensor, positions: torch.Tensor,
                    prompt_lengths: torch.Tensor, plan: LoraPlan | None, seqs: Sequence[_Sequence]) -> torch.Tensor | None:
        """The fixed-shape step of ``rows`` rows; None when its CUDA graph could not be captured: graphs are then
        off for this engine (logged once) and the caller runs the usual step (what a capture wrote lies beyond the
        rows' lengths or in the spare slot, and is overwritten)."""
        try:
            logits = self._graphs.run(shape, step_ids, positions, prompt_lengths, [s.adapter_slot for s in seqs])
        except GraphCaptureError as exc:
            self.kv.abandon()
            self._graphs = None
            log.warning("%s; this engine decodes without CUDA graphs from now on", exc)
            return None
        self._count_forward(rows, plan)
        return logits

    def _decode_apart(self, batch: _Batch, step_ids: torch.Tensor) -> None:
        """One decode step row by row, each on its own slot: rows whose forward raises fail alone; the others
        stay in the batch (the next step is batched as usual)."""
        kept, logits = [], []
        for i, seq in enumerate(batch.seqs):
            try:
                logits.append(self._decode_rows(i, i + 1, step_ids[i : i + 1], self._plan([seq], i)))
            except Exception as exc:
                self._fail(seq, exc)
                continue
            kept.append(seq)
        if kept:
            self._after_step(kept, torch.cat(logits))
        self._compact()

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        images: dict[str, torch.Tensor],
        plan: LoraPlan | None,
        prompt_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """One forward through the KV cache (planned by the caller); the last position's logits ``[B, V]``. ``mask``
        None: plain causal attention is exact (``SlotKVCache``'s mask methods), the fused kernel runs."""
        self._count_forward(ids.shape[0], plan)
        with self.lora.activate(plan):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.kv,
                             use_cache=True, prompt_lengths=prompt_lengths, logits_to_keep=1, **images)
        return out.logits[:, -1, :]

    def _count_forward(self, rows: int, plan: LoraPlan | None) -> None:
        self.stats.forwards += 1
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.max_adapters_in_forward = max(self.stats.max_adapters_in_forward,
                                                 len(plan.adapters) if plan else 0)

    def _plan(self, seqs: Sequence[_Sequence], first_slot: int) -> LoraPlan | None:
        """The LoRA plan of ``seqs``, the rows of KV slots ``first_slot ..`` (views of the adapter slots)."""
        rows = self._rows.adapter_slot[first_slot : first_slot + len(seqs)]
        return self.adapter_slots.plan(rows, [s.adapter_slot for s in seqs], (s.adapter for s in seqs))

    def _compact(self) -> None:
        """Drop finished and abandoned rows: the last running row moves into each leaver's slot (one row copied,
        the others stay where they are)."""
        batch = self._batch
        if batch is None:
            return
        seqs = list(batch.seqs)
        leaving = [i for i, s in enumerate(seqs) if s.state.done or s.cancelled or s.failed]
        if not leaving:
            return
        for i in reversed(leaving):
            self.adapter_slots.release(seqs[i].adapter_slot)
            seqs[i].adapter_slot = 0
            last = len(seqs) - 1
            if i != last:
                self.kv.move(last, i)
                self._rows.move(last, i)
                seqs[i] = seqs[last]
            else:
                self.kv.release(i)
            seqs.pop()
        self._batch = _Batch(seqs, self._plan(seqs, 0)) if seqs else None

    # ----- emitting tokens ------------------------------------------------------------------------------------
    def decode_text(self, ids: Sequence[int]) -> str:
        """Generated ids as text: ordinary tokens plus grounding markup (``<ref>``, ``<box>``, ``<quad>``)."""
        return self.processor.decode(ids)

    def _after_step(self, seqs: Sequence[_Sequence], logits: torch.Tensor) -> None:
        """Each row's next token, text and event (the step's events handed over together: ``deliver``); a row whose
        part of this raises fails alone."""
        try:
            chosen: list[int | None] = list(next_tokens(logits, [s.state for s in seqs]))
        except Exception:  # a row's sampling failed (e.g. NaN logits): choose row by row to fail only that row
            chosen = [self._choose_alone(seq, logits[i : i + 1]) for i, seq in enumerate(seqs)]
        now, events = time.perf_counter(), []
        try:
            for seq, token in zip(seqs, chosen, strict=True):
                if seq.cancelled or seq.failed or token is None:
                    continue
                try:
                    advance_row(seq.state, token, self.decode_text)
                    seq.generated += 1
                    event = self._progress(seq, now)
                    if event is not None:
                        events.append((seq.emit, event))
                except Exception as exc:
                    self._fail(seq, exc)
        finally:
            deliver(events)

    def _choose_alone(self, seq: _Sequence, logits: torch.Tensor) -> int | None:
        # (rows sampled before the failing one drew from their generators twice in this step; seeds still hold
        # for every step without a failure)
        try:
            return next_tokens(logits, [seq.state])[0]
        except Exception as exc:
            self._fail(seq, exc)
            return None

    def _progress(self, seq: _Sequence, now: float) -> EngineEvent | None:
        """The event a row's new token makes (None: its text is held back, a possible stop string's start or a
        partial character); its metrics."""
        state = seq.state
        text = state.text or ""
        end = len(text) if state.done else safe_text_end(text, state.params.stop_strings)
        new_ids = state.tokens[seq.sent_tokens :]
        if self.metrics:
            if seq.last_token_at is None:
                label = adapter_label(seq.request.adapter_id)
                self.metrics.series(self.metrics.ttft, label).observe(now - seq.arrived)
                seq.itl = self.metrics.series(self.metrics.itl, label)
            else:
                seq.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if not state.done and end <= seq.sent_chars:
            return None
        event = EngineEvent(text=text[seq.sent_chars : end], token_ids=new_ids)
        if state.params.logprobs is not None:
            event.logprobs = describe_logprobs(vocabulary(self.processor), state.logprobs[seq.sent_tokens :])
        seq.sent_chars, seq.sent_tokens = max(end, seq.sent_chars), len(state.tokens)
        if state.done:
            event.finish_reason = state.finish_reason
            event.prompt_tokens, event.completion_tokens = len(seq.prompt_ids), seq.generated
            event.grounding = ground_boxes(self.processor, text, seq.image_sizes)
            if self.metrics:
                label = adapter_label(seq.request.adapter_id)
                self.metrics.series(self.metrics.e2e, label).observe(now - seq.arrived)
                self.metrics.series(self.metrics.prompt_tokens, label).inc(len(seq.prompt_ids))
                self.metrics.series(self.metrics.generated_tokens, label).inc(seq.generated)
                self.metrics.series(self.metrics.requests, label, "ok").inc()
        return event


def kv_cache_budget(config: EngineConfig, free_device_bytes: int | None) -> int | None:
    """The KV cache's bytes: ``kv_cache_bytes`` when set; else, on a GPU (``free_device_bytes``: free after the
    weights and adapter slots), ``kv_cache_memory_fraction`` of that less the vision copies' reserve
    (``vision_adapter_bytes``); None on the CPU (``max_batch_size`` slots)."""
    if config.kv_cache_bytes is not None or free_device_bytes is None:
        return config.kv_cache_bytes
    return int(max(0, free_device_bytes - config.vision_adapter_bytes) * config.kv_cache_memory_fraction)


def _allocate_cache(model: torch.nn.Module, config: EngineConfig) -> SlotKVCache:
    """The engine's KV cache on the model's device, in the dtype of its embeddings (module docstring of
    ``kv_cache``; sizing: ``EngineConfig.kv_cache_bytes``)."""
    dtype, device = _lm_dtype_device(model)
    shape = cache_shape_of(model.config)
    slot_bytes = shape.bytes_per_token(dtype) * config.max_total_tokens
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and config.kv_cache_bytes is None else None
    budget = kv_cache_budget(config, free)
    spare = config.decode_graphs != "off"  # a slot more, for the padding rows of fixed-shape steps
    slots = config.max_batch_size if budget is None else min(config.max_batch_size, budget // slot_bytes - spare)
    if slots < 1:
        raise QwenVLError(f"the KV cache budget ({budget} bytes) holds no request of max_total_tokens "
                          f"{config.max_total_tokens} ({slot_bytes} bytes each); raise kv_cache_bytes or lower "
                          "max_total_tokens")
    return SlotKVCache(shape, slots, config.max_total_tokens, dtype, device, spare_slot=spare)


def _check_choices(config: EngineConfig) -> None:
    """The settings that choose a path, each one of its values (a ``QwenVLError`` naming it otherwise)."""
    choices = {"fuse_siblings": ("auto", "on", "off"), "lora_decode": ("auto", "dense", "grouped"),
               "decode_graphs": ("off", "cuda", "static")}
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise QwenVLError(f"{name} {value!r}: expected " + ", ".join(repr(a) for a in allowed[:-1])
                              + f" or {allowed[-1]!r}")
    if config.decode_graph_attend_step < 1:
        raise QwenVLError(f"decode_graph_attend_step must be >= 1, got {config.decode_graph_attend_step}")
    if config.max_batch_size is not None and config.max_batch_size < 1:
        raise QwenVLError(f"max_batch_size must be >= 1 or None, got {config.max_batch_size}")
    if config.stall_timeout_s is not None and not config.stall_timeout_s > 0:
        raise QwenVLError(f"stall_timeout_s must be > 0 or None (never), got {config.stall_timeout_s}")
    if config.prefill_chunk_tokens is not None and config.prefill_chunk_tokens < 0:
        raise QwenVLError(f"prefill_chunk_tokens must be >= 0 (0: whole prompts) or None, got "
                          f"{config.prefill_chunk_tokens}")


def _decode_graphs(model: torch.nn.Module, family: ModelFamily, config: EngineConfig, cache: SlotKVCache,
                   lora: GroupedLora, slots: AdapterSlots) -> DecodeGraphs | None:
    """The fixed-shape decode steps ``EngineConfig.decode_graphs`` asks for (None: "off")."""
    if config.decode_graphs == "off":
        return None
    text = model.config  # v1's length-dependent rotary (dynamic NTK, logn) reads lengths beyond seq_length
    length_dependent = family.name == FamilyName.QWEN_VL and (text.use_dynamic_ntk or text.use_logn_attn)
    seq_length = text.seq_length if length_dependent else None
    return DecodeGraphs(model, cache, lora, slots, seq_length, config.decode_graph_attend_step,
                        capture=config.decode_graphs == "cuda")


def _request_of(item: EngineRequest | PreparedRequest) -> EngineRequest:
    return item.request if isinstance(item, PreparedRequest) else item


def _tower_weights(seq: _Sequence) -> VisionWeights | None:
    """The vision-tower weights ``seq``'s images are encoded with (None: the base tower)."""
    return seq.adapter.vision if seq.adapter is not None else None


def _lm_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The language model's compute dtype and device: its token embeddings' (never quantized)."""
    weight = model.get_input_embeddings().weight
    return weight.dtype, weight.device


class _Abandoned(Exception):
    """The chunked request was cancelled or failed meanwhile."""


def ground_boxes(processor: FamilyProcessor, text: str, sizes: Sequence[tuple[int, int]]) -> list[ImageBoxes]:
    """The boxes of ``text``, in the family's grounding convention (v1's ``<box>`` markup, Qwen2-VL's box tokens,
    Qwen2.5/3-VL's JSON), in pixels of each input image of size ``(width, height)``."""
    result = []
    for index, (width, height) in enumerate(sizes):
        objects = processor.parse_boxes(text, (width, height))
        if objects:
            result.append(ImageBoxes(index, width, height, objects))
    return result


def join_events(events: Sequence[EngineEvent]) -> EngineEvent:
    """Consecutive events of one request as one: their text, token ids and logprobs in order, the rest (finish
    reason, usage, grounding) the last one's."""
    if len(events) == 1:
        return events[0]
    return dataclasses.replace(events[-1], text="".join(e.text for e in events),
                               token_ids=[i for e in events for i in e.token_ids],
                               logprobs=[r for e in events for r in e.logprobs])


async def read_events(queue: asyncio.Queue[EngineEvent | BaseException], coalesce: float | None
                      ) -> AsyncIterator[EngineEvent]:
    """A request's events from the queue its ``Outlet`` fills, to its last one; an error item is raised (after the
    events joined before it). ``coalesce``: as ``ServingEngine.stream``'s."""
    loop, sent_at = asyncio.get_running_loop(), None
    while True:
        item, error = await queue.get(), None
        if coalesce is not None and not isinstance(item, BaseException):
            wait = 0.0 if sent_at is None or item.finish_reason else sent_at + coalesce - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            item, error = _ready_behind(item, queue)
            sent_at = loop.time()
        if isinstance(item, BaseException):
            raise item
        yield item
        if error is not None:
            raise error
        if item.finish_reason is not None:
            return


async def whole_result(events: AsyncIterator[EngineEvent]) -> EngineResult:
    """A request's whole answer from its stream of events."""
    whole = join_events([event async for event in events])
    assert whole.finish_reason is not None
    return EngineResult(whole.text, whole.token_ids, whole.finish_reason, whole.prompt_tokens,
                        whole.completion_tokens, whole.grounding)


def _ready_behind(first: EngineEvent, queue: asyncio.Queue[EngineEvent | BaseException]
                  ) -> tuple[EngineEvent, BaseException | None]:
    """``first`` and the events ready behind it in ``queue`` as one event, and an error that followed them (None:
    none; it is raised after they are sent)."""
    events = [first]
    while not queue.empty() and events[-1].finish_reason is None:
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            return join_events(events), item
        events.append(item)
    return join_events(events), None


class Outlet:
    """Where a request's events go: the queue its stream awaits, on that stream's event loop (its ``channel``).
    Called, it hands one item over at once (an error); ``deliver`` hands a step's events over together."""

    __slots__ = ("channel", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[EngineEvent | BaseException]) -> None:
        self.channel, self.queue = loop, queue

    def __call__(self, item: EngineEvent | BaseException) -> None:
        _call_soon(self.channel, self.queue.put_nowait, item)

    @staticmethod
    def hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[Outlet, EngineEvent]]) -> None:
        """Several outlets' events on one loop, with one call into it."""
        _call_soon(loop, _put_each, [(outlet.queue, event) for outlet, event in items])


def deliver(events: Sequence[tuple[Callable[[EngineEvent | BaseException], None], EngineEvent]]) -> None:
    """Hand a step's events to their receivers in order: a receiver with a ``channel`` (an ``Outlet``: its event
    loop; ``engine_process``: the pipe to the replica) gets them with one ``hand_over`` per channel (each call from
    this thread into an event loop writes to its wake-up socket and wakes it: per row and step, that was a write
    and a wake-up for each of a GPU batch's 64 rows), any other receiver (a test's list) directly."""
    by_channel: dict[tuple[type, Any], list[tuple[Any, EngineEvent]]] = {}
    for emit, event in events:
        channel = getattr(emit, "channel", None)
        if channel is None:
            emit(event)
        else:
            by_channel.setdefault((type(emit), channel), []).append((emit, event))
    for (kind, channel), items in by_channel.items():
        kind.hand_over(channel, items)


def _put_each(items: list[tuple[asyncio.Queue, EngineEvent]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass
