"""Checkpoint contents, exact resume, and the final adapter directory.

A checkpoint directory (written by every rank into its own local directory, then merged by the caller, e.g.
Ray Train, into one) holds:

    state.json            rank 0: step, epoch, position in the epoch (global micro-batches), sampler state,
                          data-order digest, samples / tokens seen, loss history, early-stopping state
    rng_rank{r}.pt        every rank: torch / Python / NumPy (/ CUDA) RNG states
    trainable.pt, optimizer.pt, scheduler.pt       DDP / single process (rank 0)
    step_{N}/...          DeepSpeed: ``save_checkpoint`` shards of every rank (frozen weights excluded)

Loading restores all of it, so the continued run takes exactly the steps the uninterrupted one would have.
The final adapter is a PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``) plus
``meta.json`` (base model, family, targets, job id, sha256 of the weights, training summary).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenvl_core.training.strategies import Engine

STATE_FILE = "state.json"
META_FILE = "meta.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class TrainState:
    """Where training stands; everything needed, with the engine and RNG states, to continue exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # global micro-batches of ``epoch`` already trained on
    samples_seen: int = 0
    tokens_seen: int = 0
    data_digest: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    resumed_from_step: int | None = None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, engine: Engine, state: TrainState, sampler_state: dict[str, Any],
                    rank: int) -> None:
    """This rank's part of checkpoint ``state.step`` into ``directory`` (every rank must call it)."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save(directory, tag_of(state.step))
    torch.save(capture_rng(), directory / rng_file(rank))
    if rank == 0:
        doc = {"state": asdict(state), "sampler": sampler_state, "tag": tag_of(state.step)}
        (directory / STATE_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def load_checkpoint(directory: Path, engine: Engine, rank: int) -> tuple[TrainState, dict[str, Any]]:
    """Restore the engine and this rank's RNG from ``directory``; returns the state and the sampler state."""
    doc = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    engine.load(directory, doc["tag"])
    rng = directory / rng_file(rank)
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))
    state = TrainState(**{**doc["state"], "losses": [tuple(x) for x in doc["state"]["losses"]]})
    state.resumed_from_step = state.step
    return state, doc["sampler"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path,
                 meta: dict[str, Any]) -> Path:
    """Write the PEFT adapter of ``model`` with ``weights`` (full trainable tensors) and ``meta.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), state_dict=weights)  # type: ignore[operator]
    meta = {**meta, "sha256": {ADAPTER_WEIGHTS: sha256_file(out_dir / ADAPTER_WEIGHTS)}}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return out_dir
