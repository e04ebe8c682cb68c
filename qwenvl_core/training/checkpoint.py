"""Checkpoint contents, exact resume, and the final adapter directory.

A checkpoint directory (written by every rank into its own local directory, then merged by the caller, e.g.
Ray Train, into one) holds:

    state.json            rank 0: step, epoch, position in the epoch (global micro-batches), sampler state,
                          data-order digest, samples / tokens seen, loss history, early-stopping state
    rng_rank{r}.json      every rank: torch / Python / NumPy (/ CUDA) RNG states as plain JSON numbers
    trainable.pt, optimizer.pt, scheduler.pt       DDP / single process (rank 0)
    step_{N}/...          DeepSpeed: ``save_checkpoint`` shards of every rank (frozen weights excluded)
    adapter/              rank 0: the PEFT adapter of this step, like the final one (served and continued from
                          as the checkpoint's model ``ft:...:ckpt-step-N``; not read on resume)

Loading restores all of it, so the continued run takes exactly the steps the uninterrupted one would have.
Nothing is unpickled: ``.pt`` files are read with ``torch.load(weights_only=True)`` (tensors, numbers, strings
and containers only; ``load_torch_file``), so a checkpoint written by someone else cannot run code on load.
A file holding anything else is refused with ``CheckpointError``.
The final adapter is a PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``) plus
``meta.json`` (base model, family, targets, job id, sha256 of the weights, training summary).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qwenvl_core.errors import QwenVLError

if TYPE_CHECKING:
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
    # the fine-tuned model's evaluations so far, periodic and final: (step, {"eval/loss": ..., ...})
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    resumed_from_step: int | None = None


class CheckpointError(QwenVLError):
    """A checkpoint file cannot be loaded safely (or at all)."""


def load_torch_file(path: Path, allowed: Sequence[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors, numbers, strings and containers
    only, plus the classes in ``allowed`` (data-only classes a library's checkpoints hold, e.g. DeepSpeed's).
    Anything else (a pickled object, whose loading could run code) is refused with ``CheckpointError``."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"checkpoint file {path} was refused: it holds pickled objects other than tensors and plain "
            f"containers, and checkpoints are loaded without unpickling code ({first[0] if first else exc})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from exc


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> dict[str, Any]:
    """The RNG states as JSON-ready values (byte tensors as lists of ints, NumPy's key array as a list)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }
    if torch.cuda.is_available():  # the rank's own GPU (the trainer made it current): a resumed rank may see others
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _read_rng(directory: Path, rank: int) -> dict[str, Any] | None:
    path = directory / rng_file(rank)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from exc


def save_checkpoint(directory: Path, engine: Engine, state: TrainState, sampler_state: dict[str, Any],
                    rank: int) -> None:
    """This rank's part of checkpoint ``state.step`` into ``directory`` (every rank must call it)."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save(directory, tag_of(state.step))
    (directory / rng_file(rank)).write_text(json.dumps(capture_rng()), encoding="utf-8")
    if rank == 0:
        doc = {"state": asdict(state), "sampler": sampler_state, "tag": tag_of(state.step)}
        (directory / STATE_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def load_checkpoint(directory: Path, engine: Engine, rank: int) -> tuple[TrainState, dict[str, Any]]:
    """Restore the engine and this rank's RNG from ``directory``; returns the state and the sampler state."""
    doc = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    engine.load(directory, doc["tag"])
    rng = _read_rng(directory, rank)
    if rng is not None:
        restore_rng(rng)
    state = TrainState(**{**doc["state"], "losses": [tuple(x) for x in doc["state"]["losses"]],
                          "evaluations": [tuple(x) for x in doc["state"].get("evaluations", [])]})
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


def add_adapter_meta(out_dir: Path, extra: dict[str, Any]) -> None:
    """Merge ``extra`` into the adapter's ``meta.json`` (one level deep: dict values are updated, not replaced)."""
    path = out_dir / META_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key, value in extra.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) and isinstance(meta.get(key), dict) else value
    path.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
