"""One forward of the serving engine's model with mixed-adapter LoRA, this tree's ``GroupedLora`` against an earlier
revision's, in the same process on the same model and adapters (interleaved, min of N: robust on a shared machine).

Cases: ``base`` (no adapter), ``single`` (every row on one adapter), ``mixed`` (rows spread over 8 adapters), each
with this tree's ``lora_batch`` / ``adapter_slots`` (``new``) and ``--before-rev``'s (``old``, read with
``git show``), plans made as the engine makes them (views of ``AdapterSlots`` device slots). Prints the times and
the ratios mixed/single and mixed/base (the LoRA overhead) of both, and the largest logit difference new vs old.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/lora_forward_ab.py [--preset qwen2.5-vl-small] [--rows 16 --tokens 1]
       [--lora-decode dense]
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def old_module(name: str, rev: str, path: str, patch: tuple[str, str] | None = None,
               source: str | None = None) -> types.ModuleType:
    """The module at ``path`` as it was at ``rev`` (``git show``; or ``source``, its text, where there is no git
    history, as on the device machine), loaded under ``name``."""
    if source is None:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                                check=True).stdout
    if patch:
        source = source.replace(*patch)
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # the repository's own code, at that revision
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--before-rev", default="db4ef4a", help="the revision whose GroupedLora is 'old'")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1, help="tokens per row (1: a decode step's shapes)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-decode", default="auto", choices=["auto", "dense", "grouped"],
                        help="this tree's way of running a decode step of several adapters (EngineConfig.lora_decode)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from serving_throughput import make_adapters

    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.serving.engine import EngineConfig, ServingEngine
    from qwenvl_core.serving.lora_batch import lora_targets

    old_lb = old_module("old_lora_batch", args.before_rev, "qwenvl_core/serving/lora_batch.py")
    old_slots_module = old_module("old_adapter_slots", args.before_rev, "qwenvl_core/serving/adapter_slots.py",
                                   ("from qwenvl_core.serving.lora_batch import", "from old_lora_batch import"))
    family = family_for_preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-ab-"))
    model_dir = family.materialize(args.preset, work / "model", seed=0, dtype=torch.float32)
    dirs = make_adapters(family, model_dir, work / "adapters", 8, args.rank, torch.float32)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=args.rows, max_adapters=10,
                                                                  lora_decode=args.lora_decode))
    weights = [engine.cache.get(d.name, str(d)) for d in dirs]
    model = engine.model
    # the old slots decode mixed adapters the way the engine's new ones do, where the old code has that choice
    dense = {"dense_decode": engine.adapter_slots.dense_decode} if "dense_decode" in inspect.signature(
        old_slots_module.AdapterSlots).parameters else {}
    old_slots = old_slots_module.AdapterSlots(8, engine.config.max_lora_rank, lora_targets(model, family),
                                              torch.device("cpu"), model.get_input_embeddings().weight.dtype, **dense)
    slot_of = {"new": [engine.adapter_slots.acquire(w) for w in weights], "old": [old_slots.acquire(w) for w in weights]}
    hooks = {"new": engine.lora, "old": old_lb.GroupedLora(model)}
    store = {"new": engine.adapter_slots, "old": old_slots}
    mixes = {"single": [weights[0]] * args.rows, "mixed": [weights[i % 8] for i in range(args.rows)]}
    cases: dict[str, tuple[object, object]] = {"base": (engine.lora, None)}
    for mix, row_weights in mixes.items():
        for tag in ("new", "old"):
            slots = [slot_of[tag][weights.index(w)] for w in row_weights]
            plan = store[tag].plan(torch.tensor(slots), slots, row_weights)
            hooks[tag].ensure_hooks(list(plan.stacks))
            cases[f"{tag} {mix}"] = (hooks[tag], plan)
    ids = torch.randint(0, 100, (args.rows, args.tokens))

    @torch.inference_mode()
    def forward(lora: object, plan: object) -> torch.Tensor:
        with lora.activate(plan):
            return model(input_ids=ids, logits_to_keep=1).logits

    difference = float((forward(*cases["new mixed"]) - forward(*cases["old mixed"])).abs().max())
    times: dict[str, float] = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            forward(*case)
            times[name] = min(times[name], time.perf_counter() - start)
    print(f"preset={args.preset} rows={args.rows} tokens={args.tokens} threads={torch.get_num_threads()} "
          f"lora_decode={args.lora_decode} (old: {dense or 'no choice'}) old={args.before_rev}; max |logits new - old| (mixed) = {difference:.2e}")
    print("min ms: " + " ".join(f"{name}={t * 1000:.2f}" for name, t in times.items()))
    for tag in ("old", "new"):
        single, mixed = times[f"{tag} single"], times[f"{tag} mixed"]
        print(f"{tag}: mixed/single={single / mixed:.3f} mixed/base={times['base'] / mixed:.3f} "
              f"single/base={times['base'] / single:.3f}")
    engine.close()


if __name__ == "__main__":
    main()
