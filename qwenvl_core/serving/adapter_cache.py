"""The per-replica adapter cache: fetch (local disk or S3), size, load and LRU-evict LoRA adapters.

This module owns
- ``AdapterFetcher``: an adapter *locator* (a local directory, or ``s3://bucket/prefix`` of a PEFT adapter
  directory such as a run's ``{output_uri}/adapter``) to a local directory, downloading S3 adapters once into a
  local cache directory;
- ``safetensors_nbytes``: the bytes an adapter will take, read from the safetensors header (no tensor loaded);
- ``AdapterCache``: an LRU of ``LoraWeights`` bounded by a count *and* a byte budget. ``get`` is idempotent and
  thread-safe: a global lock guards the table, a per-adapter lock makes concurrent requests for the same cold
  adapter load it once (re-checking after taking the lock); other adapters keep being served meanwhile.
  Eviction drops the cache's reference, so the memory is freed as soon as no request in flight holds the
  adapter (requests keep their ``LoraWeights`` until they finish). Stats: loads, evictions, hits, misses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qwenvl_core.serving.lora_batch import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoraWeights
from qwenvl_core.storage import download_dir, open_store

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def safetensors_nbytes(path: str | Path, itemsize: int | None = None) -> int:
    """Total tensor bytes of a safetensors file from its header; ``itemsize`` overrides the stored dtype."""
    try:
        with Path(path).open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(f"a header of {header_len} bytes")
            header = json.loads(f.read(header_len))
        total = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            total += numel * (itemsize or _DTYPE_BYTES.get(info["dtype"], 4))
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError too
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from exc
    return total


class AdapterFetcher:
    """Adapter locators to local directories; S3 adapters are downloaded once under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def fetch(self, locator: str) -> Path:
        if not locator.startswith("s3://"):
            local = Path(locator)
            if not (local / ADAPTER_CONFIG).is_file():
                raise AdapterError(f"adapter {locator}: no {ADAPTER_CONFIG} there")
            return local
        target = self.cache_dir / hashlib.sha256(locator.encode()).hexdigest()[:24]
        if (target / ADAPTER_WEIGHTS).is_file():
            return target
        store, prefix = open_store(locator)
        partial = target.with_name(target.name + f".partial-{threading.get_ident()}")
        download_dir(store, prefix, partial)
        if not (partial / ADAPTER_CONFIG).is_file() or not (partial / ADAPTER_WEIGHTS).is_file():
            shutil.rmtree(partial, ignore_errors=True)
            raise AdapterError(f"adapter {locator}: {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} missing in storage")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return target

    def forget(self, locator: str) -> None:
        """Remove a downloaded copy (after the adapter was deleted)."""
        if locator.startswith("s3://"):
            shutil.rmtree(self.cache_dir / hashlib.sha256(locator.encode()).hexdigest()[:24], ignore_errors=True)


class CacheObserver(Protocol):
    """What the cache reports (``metrics.ServingMetrics`` implements it)."""

    def cache_hit(self, adapter_id: str) -> None: ...
    def cache_miss(self, adapter_id: str) -> None: ...
    def adapter_loaded(self, adapter_id: str, seconds: float) -> None: ...
    def adapter_evicted(self, adapter_id: str) -> None: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0  # all loads together (the per-load times are the metrics' histogram)


class _KeyLocks:
    """One lock per key while some thread holds or waits for it (then dropped: the keys are unbounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, list[int]]] = {}  # key -> (its lock, [threads using it])

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._held.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if not users[0]:
                    del self._held[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


@dataclass
class _Entry:
    weights: LoraWeights
    nbytes: int
    locator: str


# (local adapter directory, adapter id) -> weights; the engine binds it to its model.
WeightsLoader = Callable[[Path, str], LoraWeights]


class AdapterCache:
    """LRU of loaded adapters, bounded by ``max_adapters`` and ``max_bytes`` (None: no byte bound)."""

    def __init__(
        self,
        load_weights: WeightsLoader,
        fetcher: AdapterFetcher,
        *,
        max_adapters: int = 8,
        max_bytes: int | None = None,
        itemsize: int | None = None,
        observer: CacheObserver | None = None,
    ) -> None:
        if max_adapters < 1:
            raise AdapterError(f"max_adapters must be >= 1, got {max_adapters}")
        self._load_weights, self._fetcher = load_weights, fetcher
        self.max_adapters, self.max_bytes, self._itemsize = max_adapters, max_bytes, itemsize
        self._observer = observer
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks = _KeyLocks()  # one load per adapter at a time
        self.stats = CacheStats()

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def ids(self) -> list[str]:
        """Cached adapter ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def get(self, adapter_id: str, locator: str) -> LoraWeights:
        """The adapter's weights, loading (and evicting others) if it is not cached. Blocking."""
        hit = self._lookup(adapter_id)
        if hit is not None:
            return hit
        with self._key_locks.hold(adapter_id):
            hit = self._lookup(adapter_id)  # another request loaded it while we waited
            if hit is not None:
                return hit
            return self._load(adapter_id, locator)

    def _lookup(self, adapter_id: str) -> LoraWeights | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return None
            self._entries.move_to_end(adapter_id)
            self.stats.hits += 1
        if self._observer:
            self._observer.cache_hit(adapter_id)
        return entry.weights

    def _load(self, adapter_id: str, locator: str) -> LoraWeights:
        start = time.perf_counter()
        with self._lock:
            self.stats.misses += 1
        if self._observer:
            self._observer.cache_miss(adapter_id)
        local = self._fetcher.fetch(locator)
        nbytes = safetensors_nbytes(local / ADAPTER_WEIGHTS, self._itemsize)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise AdapterError(f"adapter {adapter_id}: {nbytes} bytes exceed the cache budget {self.max_bytes}")
        self._make_room(nbytes)  # before loading, so the budget also bounds the peak
        weights = self._load_weights(local, adapter_id)
        seconds = time.perf_counter() - start
        with self._lock:
            self._entries[adapter_id] = _Entry(weights, nbytes, locator)
            self.stats.loads += 1
            self.stats.load_seconds += seconds
        self._make_room(0)  # concurrent loads of other adapters may have filled the cache meanwhile
        if self._observer:
            self._observer.adapter_loaded(adapter_id, seconds)
        return weights

    def _make_room(self, incoming: int) -> None:
        evicted = []
        with self._lock:
            slots = self.max_adapters - (1 if incoming else 0)
            while self._entries and (
                len(self._entries) > slots
                or (self.max_bytes is not None and sum(e.nbytes for e in self._entries.values()) + incoming > self.max_bytes)
            ):
                evicted.append(self._entries.popitem(last=False)[0])
                self.stats.evictions += 1
        for adapter_id in evicted:
            if self._observer:
                self._observer.adapter_evicted(adapter_id)

    def evict(self, adapter_id: str, *, forget_files: bool = False) -> bool:
        """Drop an adapter (deleted, or unloaded by the router); False if it was not cached."""
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is not None:
                self.stats.evictions += 1
        if entry is None:
            return False
        if forget_files:
            self._fetcher.forget(entry.locator)
        if self._observer:
            self._observer.adapter_evicted(adapter_id)
        return True
