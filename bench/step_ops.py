"""Ops dispatched per decode step of the serving engine, with no adapter, one adapter and 8 mixed adapters; this
tree against an earlier revision's (``--before-rev``, in a git worktree) in the same run.

Why: on a GPU a decode step of a 7-10B model is bound by how many ops it launches and the Python around each, not
by the device (docs/benchmarks.md, "First runs on an H200": 34 ms per step where reading the weights takes ~4 ms),
so the number of ops a step dispatches is what its time follows there; unlike a time it is exact and the same on
any machine. Counted with a ``TorchDispatchMode`` over whole engine steps (the model, the LoRA hooks, sampling,
the engine's bookkeeping), 16 rows, after the prefill, on the paths a GPU takes (``lora_decode="dense"``,
``fuse_siblings="on"`` where the tree has them); ``views`` (no kernel of their own, but still dispatched in
Python) counted apart. Prints one line per scenario and revision, and the ratios after / before. Then the prefill
forward of a join: ``JOIN`` requests (no adapter; or two adapters and the base, interleaved) joining a running
batch, a forward that costs a GPU its launches the same way (a batch whose requests end at different times takes
one every few steps).

Then a whole workload: 64 requests of 4-32 new tokens (``serving_throughput.varied_lengths``), one adapter, all
queued at once, run to the end through the engine (batch 16): ops and forwards per generated token, per revision,
against the static-batch baseline of ``serving_throughput`` (batches of 16 run to their longest request, peft)
counted the same way: on a GPU the engine's advantage over static batching is this ratio.

Beside the dispatched ops, what the device ran in the same steps (``torch.profiler``): on CUDA the kernels (what a
launch-bound GPU step pays for; a composite op such as ``rms_norm`` is one fused kernel there or several), on the CPU
the leaf ops. ``bench/gpu_check.sh`` runs it on the GPU (``--steps-only``).

Usage: .venv/bin/python bench/step_ops.py [--preset qwen-vl-small] [--before-rev 4ba4821] [--device cuda]
[--steps-only] [--dtype bfloat16] [--decode-graphs static] [--max-lora-rank 8]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from revisions import before_tree, run_json
from torch.utils._python_dispatch import TorchDispatchMode

ROWS, STEPS = 16, 4
JOIN = 4  # requests that join a running batch of ROWS - JOIN rows in the join scenarios
WORKLOAD = (64, 4, 32)  # requests, fewest and most new tokens


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active: all of them, and the views among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))


class KernelCounter:
    """What the device ran while active (``torch.profiler``): on CUDA its kernels, copies and memsets, each one launch;
    on the CPU the leaf ``aten`` ops other than views (what a composite op such as ``rms_norm`` or ``matmul``
    decomposes into there). Unlike the dispatched ops, this is what the GPU pays per launch."""

    def __init__(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profile = profile(activities=activities)
        self.kernels = 0

    def __enter__(self) -> KernelCounter:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.autograd import DeviceType

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profile.__exit__(*exc)
        events = self._profile.events()
        if self.device.type == "cuda":
            self.kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        else:  # an op that computes, none of whose callees computes
            self.kernels = sum(1 for e in events if e.device_type == DeviceType.CPU and _computes(e.name)
                               and not any(_computes(d.name) for d in _callees(e)))


# ops that only describe a tensor, or call the ops that compute (counted there): no kernel of their own
_BOOKKEEPING = {"aten::" + name for name in ("resolve_conj", "resolve_neg", "reshape", "contiguous", "to", "type_as",
                                              "expand_as", "view_as", "flatten", "unflatten", "detach", "alias",
                                              "lift_fresh", "empty", "empty_like", "empty_strided", "_unsafe_view")}


def _computes(name: str) -> bool:
    if not name.startswith("aten::") or name in _BOOKKEEPING:
        return False
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    overloads = packet.overloads() if packet is not None else []
    return not (overloads and getattr(getattr(packet, overloads[0]), "is_view", False))


def _callees(event: Any) -> Any:
    for child in event.cpu_children:
        yield child
        yield from _callees(child)


def requests_on(engine: Any, adapters: list[Path | None], tokens: int, number: int, first: int = 0) -> list[Any]:
    """``number`` prepared text requests of ``tokens`` new tokens on ``adapters`` round-robin (None: the base), their
    prompts ``first`` onwards."""
    from serving_throughput import _fixed_length, _prompt

    from qwenvl_core.conversation import text_message
    from qwenvl_core.serving.engine import EngineRequest

    rows = [adapters[i % len(adapters)] for i in range(number)]
    return [engine._prepare(EngineRequest([text_message("user", _prompt(first + i))], _fixed_length(engine, tokens),
                                          adapter_id=a.name if a else None, adapter_locator=str(a) if a else None),
                            time.perf_counter())
            for i, a in enumerate(rows)]


def start_decoding(engine: Any, adapters: list[Path | None], tokens: int, rows: int = ROWS) -> None:
    """``rows`` requests of ``tokens`` new tokens on ``adapters`` round-robin (None: the base) prefilled together,
    and their first decode step taken (its plan and index tensors are new): the steps after are the ones to count or
    time."""
    engine._step(requests_on(engine, adapters, tokens, rows))  # the prefill
    engine._step([])


def count_join(engine: Any, adapters: list[Path | None], counter: Any) -> None:
    """Count (``counter``: an ``OpCounter`` or ``KernelCounter``) the prefill forward of ``JOIN`` requests on
    ``adapters`` joining ``ROWS - JOIN`` running rows on the same adapters (the model's forward, LoRA included; not
    the host's preparation around it, nor the decode step after it), then run the batch to its end."""
    start_decoding(engine, adapters, 2 * STEPS, ROWS - JOIN)
    joining = requests_on(engine, adapters, STEPS, JOIN, first=ROWS)
    forward = engine._forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        with counter:
            return forward(*args, **kwargs)

    engine._forward = counted
    try:
        engine._admit(joining)  # the prefill alone (an engine step would decode the batch after it)
    finally:
        del engine._forward  # the class's method again
    finish(engine)


def finish(engine: Any) -> None:
    """Run the engine's batch to its end."""
    while engine._batch is not None:
        engine._step([])


def count(preset: str, adapters: int, device: str | None = None, workload_too: bool = True,
          dtype: str = "float32", decode_graphs: str = "off",
          max_lora_rank: int | None = None) -> dict[str, dict[str, float]]:
    """(in the tree on ``sys.path``) ``{scenario: {"ops": per step, "views": per step, "kernels": per step}}`` on
    ``device`` (the engine's default: the GPU when one is visible), the model in ``dtype``, the engine's decode
    steps as ``decode_graphs`` says ("static": the fixed shapes that CUDA graphs replay, run without graphs), its
    adapter slots of rank ``max_lora_rank`` (None: the engine's default; the adapters are of rank 8)."""
    from serving_throughput import make_adapters

    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.serving.engine import EngineConfig, ServingEngine

    family = family_for_preset(preset)
    work = Path(tempfile.mkdtemp(prefix="bench-step-ops-"))
    model_dir = family.materialize(preset, work / "model", seed=0)
    paths = make_adapters(family, model_dir, work / "adapters", adapters, 8, torch.float32)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    as_on_a_gpu = {"lora_decode": "dense"} if "lora_decode" in fields else {}
    if "fuse_siblings" in fields:
        as_on_a_gpu["fuse_siblings"] = "on"
    if decode_graphs != "off":
        if "decode_graphs" not in fields:
            raise SystemExit("this revision has no EngineConfig.decode_graphs")
        as_on_a_gpu["decode_graphs"] = decode_graphs
    if max_lora_rank is not None:
        as_on_a_gpu["max_lora_rank"] = max_lora_rank
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=ROWS, max_adapters=adapters + 2,
                                                                  device=device, **as_on_a_gpu),
                                          dtype=getattr(torch, dtype))
    result = {}
    try:
        for name, chosen in {"base": [None], "single": paths[:1], "mixed": paths}.items():
            start_decoding(engine, chosen, 2 * STEPS + 4)
            counter = OpCounter()
            with counter:
                for _ in range(STEPS):
                    engine._step([])
            with KernelCounter(engine.device) as kernels:  # the next steps, apart: a profiler beside the dispatch
                for _ in range(STEPS):                     # mode would count its own ops
                    engine._step([])
            finish(engine)
            result[name] = {"ops": sum(counter.ops.values()) / STEPS, "views": counter.views / STEPS,
                            "kernels": kernels.kernels / STEPS}
        # joining rows as requests arrive: adapters interleaved, a base row among them
        for name, chosen in {"join-base": [None], "join-mixed": [paths[0], paths[1], None, paths[0]]}.items():
            count_join(engine, chosen, OpCounter())  # the first: the plans' views are made and kept
            counter, kernels = OpCounter(), KernelCounter(engine.device)
            count_join(engine, chosen, counter)
            count_join(engine, chosen, kernels)
            result[name] = {"ops": sum(counter.ops.values()), "views": counter.views, "kernels": kernels.kernels}
        if workload_too:
            result["workload"] = workload(engine, paths[0])
    finally:
        engine.close()
    return result


def workload(engine: object, adapter: Path) -> dict[str, float]:
    """The engine's ops and forwards per generated token over ``WORKLOAD`` (module docstring)."""
    from serving_throughput import _fixed_length, _prompt, varied_lengths

    from qwenvl_core.conversation import text_message
    from qwenvl_core.serving.engine import EngineRequest

    lengths = varied_lengths(*WORKLOAD)
    seqs = [engine._prepare(EngineRequest([text_message("user", _prompt(i))], _fixed_length(engine, n),
                                          adapter_id=adapter.name, adapter_locator=str(adapter)), time.perf_counter())
            for i, n in enumerate(lengths)]
    for seq in seqs:
        seq.emit = lambda _event: None
    engine._waiting.extend(seqs)
    forwards, counter = engine.stats.forwards, OpCounter()
    with counter:
        while engine._batch is not None or engine._waiting or engine._chunking is not None:
            engine._step(engine._take_new())
    tokens = sum(lengths)
    return {"ops": sum(counter.ops.values()) / tokens, "forwards": (engine.stats.forwards - forwards) / tokens}


def static_workload(preset: str) -> float:
    """Ops per generated token of ``serving_throughput.static_throughput`` over ``WORKLOAD``: the whole run less a
    run of its first batch alone (loading the model and the untimed warm-up batch, counted in both)."""
    from serving_throughput import make_adapters, static_throughput, varied_lengths

    from qwenvl_core.models.registry import family_for_preset

    family = family_for_preset(preset)
    work = Path(tempfile.mkdtemp(prefix="bench-step-ops-static-"))
    model_dir = family.materialize(preset, work / "model", seed=0)
    (adapter,) = make_adapters(family, model_dir, work / "adapters", 1, 8, torch.float32)
    lengths = varied_lengths(*WORKLOAD)
    totals = []
    for requests in (ROWS, len(lengths)):
        counter = OpCounter()
        with counter:
            static_throughput(family, model_dir, adapter, ROWS, [lengths[:requests]], torch.float32, "cpu")
        totals.append(sum(counter.ops.values()))
    return (totals[1] - totals[0]) / sum(lengths[ROWS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--before-rev", default="4ba4821", help="git revision to compare with ('' to skip)")
    parser.add_argument("--device", default=None, help="the engine's device (default: the GPU when one is visible)")
    parser.add_argument("--steps-only", action="store_true", help="the decode steps only, not the workload")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16: the casts a GPU launches)")
    parser.add_argument("--decode-graphs", default="off", choices=["off", "static", "cuda"],
                        help="the engine's EngineConfig.decode_graphs (static: the fixed-shape steps, without graphs)")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="the engine's EngineConfig.max_lora_rank (default: its default; the adapters have rank 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one revision's counts, as JSON on the last line
        print(json.dumps(count(args.preset, args.adapters, args.device, workload_too=not args.steps_only,
                               dtype=args.dtype, decode_graphs=args.decode_graphs, max_lora_rank=args.max_lora_rank)))
        return
    if args.static:
        print(json.dumps(static_workload(args.preset)))
        return

    def measured(tree: Path, role: str = "--child") -> Any:
        options = ["--preset", args.preset, "--adapters", str(args.adapters), "--dtype", args.dtype,
                   "--decode-graphs", args.decode_graphs] + (["--device", args.device] if args.device else []) \
            + (["--max-lora-rank", str(args.max_lora_rank)] if args.max_lora_rank else []) \
            + (["--steps-only"] if args.steps_only else [])
        return run_json(tree, "step_ops.py", [role, *options])

    after = measured(Path(__file__).resolve().parent.parent)
    static = None if args.steps_only else measured(Path(__file__).resolve().parent.parent, "--static")
    runs = {"after": after}
    with before_tree(args.before_rev, ["step_ops.py"]) as tree:
        if tree is not None:
            runs["before"] = measured(tree)
    print(f"preset={args.preset} dtype={args.dtype} decode_graphs={args.decode_graphs} rows={ROWS} "
          f"max_lora_rank={args.max_lora_rank or 'default'} "
          f"adapters={args.adapters} steps={STEPS}; per decode "
          "step: ops dispatched "
          "(views among them), then what ran on the device ('kernels': CUDA kernels, or the CPU's leaf ops)")
    steps = ("base", "single", "mixed")
    for what in ("ops", "kernels"):
        for label, result in runs.items():
            if what not in result["base"]:  # (a revision whose counting predates it)
                continue
            rev = "working tree" if label == "after" else args.before_rev
            print(f"{what:7} {label:6} ({rev}): " + "  ".join(
                f"{name}={result[name][what]:.0f}" + (f" ({result[name]['views']:.0f} views)" if what == "ops" else "")
                for name in steps)
                  + f"  single/base={result['single'][what] / result['base'][what]:.2f}"
                  + f"  mixed/base={result['mixed'][what] / result['base'][what]:.2f}")
        if "before" in runs and what in runs["before"]["base"]:
            print(f"{what} after/before: " + "  ".join(f"{name}={after[name][what] / runs['before'][name][what]:.2f}"
                                                      for name in steps))
    print(f"per join: the prefill forward of {JOIN} requests joining {ROWS - JOIN} running rows, no adapter (base) or "
          "adapters a, b, none, a (mixed)")
    for what in ("ops", "kernels"):
        for label, result in runs.items():
            rev = "working tree" if label == "after" else args.before_rev
            base, mixed = result["join-base"][what], result["join-mixed"][what]
            print(f"{what:7} {label:6} ({rev}): base={base:.0f}  mixed={mixed:.0f}  mixed/base={mixed / base:.2f}")
    if static is None:
        return
    requests, fewest, most = WORKLOAD
    print(f"workload: {requests} requests of {fewest}-{most} new tokens, one adapter, batch {ROWS}; per generated token:")
    print(f"static batches: ops={static:.1f}")
    for label, result in runs.items():
        if "workload" in result:  # (absent from a revision whose counting predates it)
            w = result["workload"]
            print(f"engine {label:6}: ops={w['ops']:.1f} forwards={w['forwards']:.3f}  static/engine ops="
                  f"{static / w['ops']:.2f}")


if __name__ == "__main__":
    main()
