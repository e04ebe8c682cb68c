"""Whether a model can be served now and, when not, why: the one decision ``GET /v1/models`` shows
(``servable`` / ``unservable_reason``), the chat route answers as a 4xx and the serving engine applies when it loads
an adapter (``lora_batch.read_adapter_config``), so the three never disagree. No torch: the API process uses it.

- ``config_refusal``: what the engine cannot apply in an adapter's ``adapter_config.json`` (LoRA only: no DoRA,
  LoRA bias, ...; ``modules_to_save`` in the vision tower of its base's family only; an adapter trained for another
  family than its base's, from the ``meta.json`` training writes next to it; a rank above the servers'
  ``max_lora_rank``, the rank their adapter slots hold);
- ``adapter_refusal``: a tenant's adapter (or checkpoint) on its base: base not deployed, files missing from
  storage, then ``config_refusal`` (reads ``adapter_config.json`` and ``meta.json``, and checks the weights file
  exists; no tensor is read);
- ``base_refusal``: a base model that is not deployed;
- ``base_family``: the family of a local base model directory from its ``config.json`` (``model_type``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_core.storage import StorageError, join_key, open_store

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "meta.json"  # written by training (``training.checkpoint.save_adapter``): its "family"

# config.json ``model_type`` -> family name (``registry.FamilyName``; tests check both against the registry).
FAMILY_OF_MODEL_TYPE: dict[str, str] = {"qwen": "qwen-vl", "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl",
                                        "qwen3_vl": "qwen3-vl"}
# family name -> prefix of its vision encoder's module names (``ModelFamily.component_of``; tests check it).
VISION_PREFIX: dict[str, str] = {"qwen-vl": "transformer.visual.", "qwen2-vl": "model.visual.",
                                 "qwen2.5-vl": "model.visual.", "qwen3-vl": "model.visual."}
# PEFT options that change what the adapter computes in ways the grouped LoRA does not reproduce.
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
                        "alora_invocation_tokens")

# Codes (the chat route's error ``code``, ``unservable_code`` in the listing).
BASE_NOT_DEPLOYED = "base_model_not_deployed"
FILES_MISSING = "adapter_files_missing"
NOT_SUPPORTED = "adapter_not_supported"

_FAMILIES: dict[str, str] = {}  # base model directory -> family (base_family)

# adapter_refusal's decisions, kept DECISION_TTL_S: the chat route asks on every request for an adapter and the
# listing once per adapter, and on S3 each decision is three requests. Adapters are immutable once stored (a
# deletion is seen by the callers' database first), so a decision only goes stale when storage loses files.
DECISION_TTL_S = 10.0
_DECISIONS_MAX = 4096
_decisions: OrderedDict[tuple[Any, ...], tuple[float, Refusal | None]] = OrderedDict()
_decisions_lock = threading.Lock()


@dataclass(frozen=True)
class Refusal:
    """Why a model cannot be served now: ``code`` (machine) and ``reason`` (a sentence for the user)."""

    code: str
    reason: str


def config_refusal(config: Mapping[str, Any], family: str | None = None, trained_family: str | None = None,
                   max_rank: int | None = None) -> str | None:
    """Why the serving engine cannot apply an adapter with this ``adapter_config.json`` on a base of ``family``
    (None: unknown, the family checks use ``trained_family``, the family it was trained on) whose adapter slots hold
    ranks up to ``max_rank`` (None: not checked); None when it can."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA (the serving engine applies LoRA adapters only)"
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            return f"{option} is set: not supported by the serving engine (plain LoRA only)"
    rank = largest_rank(config)
    if max_rank is not None and rank is not None and rank > max_rank:
        return (f"its LoRA rank {rank} is above the largest rank the model servers hold (max_lora_rank {max_rank}); "
                "train with a lower rank or raise the servers' max_lora_rank")
    if family and trained_family and family != trained_family:
        return f"the adapter was trained on a {trained_family} model, its base model is {family}"
    prefix = VISION_PREFIX.get(family or trained_family or "")
    saved = config.get("modules_to_save")
    if prefix and isinstance(saved, list):  # full weights are applied per image, so in the vision tower only
        outside = sorted(str(m) for m in saved if not (isinstance(m, str) and m.startswith(prefix)))
        if outside:
            return (f"modules_to_save {outside[0]!r} is outside the vision tower ({prefix}...): the serving engine "
                    "applies full weights of vision-tower modules only (a trained merger), not of the language model")
    return None


def largest_rank(config: Mapping[str, Any]) -> int | None:
    """The largest LoRA rank an ``adapter_config.json`` declares: ``r`` and its per-module ``rank_pattern`` (None
    when it declares none as an integer; the engine checks the tensors' shapes in any case)."""
    pattern = config.get("rank_pattern")
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, Mapping) else ())]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ranks) if ranks else None


def base_refusal(base_model: str, deployed: Collection[str] | None) -> Refusal | None:
    """None when ``base_model`` is among the ``deployed`` bases (None: this API has no model servers)."""
    if deployed is None:
        return Refusal(BASE_NOT_DEPLOYED, "this API serves no chat completions (no model servers are attached)")
    if base_model not in deployed:
        served = ", ".join(sorted(deployed)) or "none"
        return Refusal(BASE_NOT_DEPLOYED, f"base model {base_model} is not deployed on this cluster "
                                          f"(deployed: {served})")
    return None


def adapter_refusal(base_model: str, adapter_uri: str, deployed: Mapping[str, str | None] | None,
                    max_rank: int | None = None) -> Refusal | None:
    """Why the adapter stored at ``adapter_uri`` (a local directory or ``s3://`` prefix) on ``base_model`` cannot be
    served now; ``deployed`` maps each deployed base to its family (None: unknown), or is None without model
    servers; ``max_rank``: the servers' ``max_lora_rank`` (None: not checked). Reads the adapter's config and meta,
    checks its weights are stored; the decision is kept for ``DECISION_TTL_S``."""
    refused = base_refusal(base_model, deployed)
    if refused is not None:
        return refused
    assert deployed is not None
    key = (base_model, adapter_uri, tuple(sorted(deployed.items(), key=lambda item: item[0])), max_rank)
    now = time.monotonic()
    with _decisions_lock:
        cached = _decisions.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
    decision = _stored_adapter_refusal(base_model, adapter_uri, deployed, max_rank)
    with _decisions_lock:
        _decisions[key] = (now + DECISION_TTL_S, decision)
        _decisions.move_to_end(key)
        while len(_decisions) > _DECISIONS_MAX:
            _decisions.popitem(last=False)
    return decision


def _stored_adapter_refusal(base_model: str, adapter_uri: str, deployed: Mapping[str, str | None],
                            max_rank: int | None) -> Refusal | None:
    """``adapter_refusal`` past the deployment check, from the stored files (uncached)."""
    try:
        store, prefix = open_store(adapter_uri)
        config = store.get_bytes(join_key(prefix, ADAPTER_CONFIG))
        missing = [name for name, present in ((ADAPTER_CONFIG, config is not None),
                                              (ADAPTER_WEIGHTS, store.exists(join_key(prefix, ADAPTER_WEIGHTS))))
                   if not present]
        meta = store.get_bytes(join_key(prefix, ADAPTER_META)) if not missing else None
    except StorageError as exc:
        return Refusal(FILES_MISSING, f"the adapter's storage cannot be read: {exc}")
    if missing:
        return Refusal(FILES_MISSING, f"the adapter's files are missing from storage ({', '.join(missing)})")
    assert config is not None
    parsed, trained = _json_object(config), (_json_object(meta) or {}).get("family")
    if parsed is None:
        return Refusal(NOT_SUPPORTED, f"the adapter's {ADAPTER_CONFIG} is not a JSON object")
    reason = config_refusal(parsed, deployed.get(base_model), trained if isinstance(trained, str) else None,
                            max_rank)
    return Refusal(NOT_SUPPORTED, f"the serving engine cannot apply this adapter: {reason}") if reason else None


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(data or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def base_family(model_dir: str) -> str | None:
    """The family name of a local base model directory (its ``config.json``'s ``model_type``); None when the
    directory cannot be read here (a storage URI, a hub id) or the type is unknown. Found families are cached."""
    if model_dir in _FAMILIES:
        return _FAMILIES[model_dir]
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    family = FAMILY_OF_MODEL_TYPE.get(config.get("model_type")) if isinstance(config, dict) else None
    if family is not None:
        _FAMILIES[model_dir] = family
    return family


def deployed_families(deployed: Collection[str], model_dirs: Mapping[str, str]) -> dict[str, str | None]:
    """``adapter_refusal``'s ``deployed``: each deployed base -> its family, from its directory in ``model_dirs``
    (model id -> directory, the ``base_models`` setting) when readable here."""
    return {base: base_family(model_dirs[base]) if base in model_dirs else None for base in deployed}
