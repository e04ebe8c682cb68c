"""Adapters trained with vision-tower LoRA (``lora.vision_lora``) or a trained merger (``lora.train_adapter``: the
merger, Qwen3-VL's DeepStack mergers, v1's Resampler) are served, each image encoded with its row's adapter:

- one tower call that mixes adapters equals each image through peft's model with its adapter alone (every family);
- the engine's greedy output equals transformers' / peft's ``generate`` of each request alone for a batch mixing
  the base, a ViT-LoRA adapter, a merger adapter, an adapter with both and no language-model LoRA, text-only and
  image rows of different lengths and image sizes; the same adapters with their vision weights removed give other
  tokens, so the comparison fails if the engine ignores them;
- vision weights that do not fit the base, or full weights outside the vision tower, are refused naming the
  adapter and the key.

The adapters are built by training's own ``apply_lora`` and saved as training saves them (peft ``save_pretrained``:
``modules_to_save`` as full weights), then given random non-zero weights.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.lora_batch import AdapterError, load_lora_weights
from qwenvl_core.serving.servable import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qwenvl_core.serving.vision_adapters import DeviceCopies, VisionAdapters, tower_prefix
from qwenvl_core.specs import LoraSpec
from tests.conftest import HF_FAMILIES
from tests.devices import DEVICES
from tests.serving.test_engine import _peft_alone
from tests.serving.test_engine_families import _transformers_alone

FAMILIES = ("qwen-vl", *HF_FAMILIES)
SPECS = {  # adapter kind -> what trains
    "vit": LoraSpec(r=4, vision_lora=True),  # language-model LoRA + LoRA on the ViT
    "merger": LoraSpec(r=4, train_adapter=True),  # language-model LoRA + the merger(s) / Resampler
    "vision-only": LoraSpec(r=4, vision_lora=True, train_adapter=True, freeze_language_model=True),
}


def _build(family_name: str, model_dir: Path, spec: LoraSpec, out: Path, seed: int) -> Path:
    from qwenvl_core.training.lora import apply_lora

    family = get_family(family_name)
    torch.manual_seed(seed)
    peft_model = apply_lora(family.load_model(model_dir), family, spec)
    with torch.no_grad():  # every trained tensor non-trivial: LoRA B non-zero (the LM's small, so images still
        for name, param in peft_model.named_parameters():  # matter), the merger moved off the base
            if param.requires_grad and "lora_A" not in name:
                vision = ".visual." in name
                param.add_(torch.randn_like(param) * (0.5 if "lora_B" not in name else 1.0 if vision else 0.1))
    peft_model.save_pretrained(out)
    return out


def _without_vision(adapter: Path, base: dict[str, torch.Tensor], prefix: str, out: Path) -> Path:
    """A copy of ``adapter`` whose vision-tower weights are the base's (LoRA B zero, the merger the base's own):
    what serving it would give if the engine ignored them."""
    shutil.copytree(adapter, out)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        if name.startswith(prefix):
            tensors[key] = torch.zeros_like(value) if ".lora_B" in key else value if ".lora_A" in key else base[name]
    save_file(tensors, out / ADAPTER_WEIGHTS)
    return out


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, tiny_dirs: dict[str, Path]) -> dict[str, Path]:
    return {"qwen-vl": tiny_model_dir, **tiny_dirs}


@pytest.fixture(scope="module")
def adapters(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """``{family: {kind: adapter directory}}`` for the kinds of ``SPECS``."""
    root = tmp_path_factory.mktemp("vision-adapters")
    return {name: {kind: _build(name, model_dirs[name], spec, root / name / kind, seed)
                   for seed, (kind, spec) in enumerate(SPECS.items(), start=1)} for name in FAMILIES}


def _tower_args(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """How the model calls its tower: v1 ``(pixel_values)``, the transformers families ``(patches, grid_thw)``."""
    return (tensors["pixel_values"], *([tensors["image_grid_thw"]] if "image_grid_thw" in tensors else []))


def _features(out: object) -> list[torch.Tensor]:
    """The tower output's per-image features: v1's tensor, or the merged output (+ DeepStack features)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_one_tower_call_mixing_adapters_equals_each_image_with_its_adapter_alone(family_name, model_dirs, adapters):
    from peft import PeftModel

    family, model_dir, own = get_family(family_name), model_dirs[family_name], adapters[family_name]
    processor = family.load_processor(model_dir)
    model = family.load_model(model_dir).eval()
    weights = {kind: load_lora_weights(own[kind], kind, model, family).vision for kind in ("vit", "merger")}
    kinds = ["vit", None, "merger", "merger", "vit"]  # 4 runs: vit | base | merger merger | vit
    sizes = [(56, 84), (28, 28), (112, 56), (56, 56), (84, 28)]
    images = [processor.vision_inputs([ImagePart(Image.new("RGB", s, (40 * i, 90, 160)))])
              for i, s in enumerate(sizes)]
    batch = {key: torch.cat([image.tensors[key] for image in images]) for key in images[0].tensors}
    vision = VisionAdapters(model, family)
    tower = family.vision_tower(model)
    with torch.no_grad(), vision.encoding((weights[k] if k else None, img) for k, img in zip(kinds, images, strict=True)):
        mixed = _features(tower(*_tower_args(batch)))
    with torch.no_grad():
        assert all(not torch.equal(a, b) for a, b in zip(mixed, _features(tower(*_tower_args(batch))), strict=True))
    alone_towers = {None: tower}
    for kind in ("vit", "merger"):
        alone_towers[kind] = family.vision_tower(PeftModel.from_pretrained(family.load_model(model_dir),
                                                                           own[kind]).eval())
    with torch.no_grad():
        alone = [_features(alone_towers[k](*_tower_args(dict(img.tensors)))) for k, img in zip(kinds, images, strict=True)]
    for got, *per_image in zip(mixed, *alone, strict=True):
        torch.testing.assert_close(got, torch.cat(per_image), rtol=1e-5, atol=1e-5)
    assert vision.stats.max_runs == 4 and vision.stats.passes == 3  # one pass per run, the base one plain
    vision.close()
    assert "forward" not in vars(tower)  # the tower's own forward again
    fresh = family.load_model(model_dir).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())  # base weights never written


def _request(i: int, kind: str | None, own: dict[str, Path], sizes: tuple[tuple[int, int], ...]) -> EngineRequest:
    parts: list = [TextPart("describe item " + "and more " * i + str(i))]
    parts[:0] = [ImagePart(Image.new("RGB", size, (30 * i % 255, 20 * k, 200))) for k, size in enumerate(sizes)]
    adapter = own[kind] if kind else None
    return EngineRequest([Message(role="user", parts=parts)], SamplingParams(max_new_tokens=8, logprobs=0),
                         adapter_id=kind, adapter_locator=str(adapter) if adapter else None)


async def _tokens_and_first_logprob(engine: ServingEngine, request: EngineRequest) -> tuple[list[int], float]:
    ids, logprobs = [], []
    async for event in engine.stream(request):
        ids.extend(event.token_ids)
        logprobs.extend(item.logprob for item in event.logprobs)
    return ids, logprobs[0]


def _first_logprobs(family_name: str, model_dir: Path, adapter: Path, request: EngineRequest) -> torch.Tensor:
    """Reference: peft's model with ``adapter``, this prompt alone: log-probabilities of the first token (image
    tokens suppressed, as serving does)."""
    from peft import PeftModel

    family = get_family(family_name)
    processor = family.load_processor(model_dir)
    model = PeftModel.from_pretrained(family.forward_contract(family.load_model(model_dir)), adapter).eval()
    encoded = processor.encode_chat(request.messages)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **encoded.vision.as_kwargs()).logits[0, -1]
    logits[list(processor.image_token_ids)] = float("-inf")
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_engine_greedy_equals_generate_for_a_batch_mixing_vision_adapters(family_name, model_dirs, adapters,
                                                                            tmp_path):
    model_dir, own = model_dirs[family_name], adapters[family_name]
    rows = [("merger", ()), (None, ((56, 84),)), ("vit", ((56, 84),)), ("merger", ((84, 28),)),
            ("vision-only", ((112, 56), (28, 56)))]
    requests = [_request(i, kind, own, sizes) for i, (kind, sizes) in enumerate(rows)]
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=8, max_total_tokens=512,
                                                                  prefill_chunk_tokens=0))
    try:
        async def together() -> list:
            return await asyncio.gather(*(_tokens_and_first_logprob(engine, r) for r in requests))

        results = asyncio.run(together())
    finally:
        engine.close()

    def reference(adapter: Path | None, request: EngineRequest) -> list[int]:
        if family_name == "qwen-vl":
            return _peft_alone(model_dir, adapter, request)
        return _transformers_alone(family_name, model_dir, adapter, request)

    expected = [reference(own[kind] if kind else None, r) for (kind, _), r in zip(rows, requests, strict=True)]
    assert [ids for ids, _ in results] == expected
    assert engine.vision.stats.max_runs >= 2  # one tower call really mixed adapters
    base = get_family(family_name).load_model(model_dir)
    prefix = tower_prefix(base, get_family(family_name))[1]
    for row in (2, 3, 4):  # the first token's log-probability is peft's, and not what ignoring the vision
        kind, (ids, logprob) = rows[row][0], results[row]  # weights would give: the comparison has teeth
        applied = _first_logprobs(family_name, model_dir, own[kind], requests[row])[ids[0]]
        ignored = _first_logprobs(family_name, model_dir, _without_vision(own[kind], base.state_dict(), prefix,
                                                                          tmp_path / f"{kind}-{row}"), requests[row])
        assert logprob == pytest.approx(float(applied), abs=1e-4), (kind, row)
        assert abs(float(applied - ignored[ids[0]])) > 1e-2, (kind, row)


def _broken(adapter: Path, out: Path, edit) -> Path:
    shutil.copytree(adapter, out)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, out / ADAPTER_WEIGHTS)
    return out


@pytest.mark.parametrize("family_name", ["qwen-vl", "qwen3-vl"])
def test_vision_weights_that_do_not_fit_the_base_are_refused_naming_the_adapter_and_key(family_name, model_dirs,
                                                                                        adapters, tmp_path):
    own = adapters[family_name]
    merger_key = next(k for k in load_file(own["merger"] / ADAPTER_WEIGHTS) if "lora_" not in k)
    vit_key = next(k for k in load_file(own["vit"] / ADAPTER_WEIGHTS) if "visual" in k and "lora_A" in k)

    def grow(key: str):
        def edit(tensors: dict[str, torch.Tensor]) -> None:
            tensors[key] = torch.cat([tensors[key], tensors[key][:1]])

        return edit

    def add_lm_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)

    cases = {
        "bad-merger": (_broken(own["merger"], tmp_path / "bad-merger", grow(merger_key)),
                       rf"adapter bad-merger \(.*bad-merger.*\): '{re.escape(merger_key)}' has shape"),
        "bad-vit": (_broken(own["vit"], tmp_path / "bad-vit", grow(vit_key)),
                    f"bad-vit.*{re.escape(vit_key.removeprefix('base_model.model.').split('.lora_A')[0])} has A"),
        "lm-head": (_broken(own["merger"], tmp_path / "lm-head", add_lm_head),
                    r"adapter lm-head .*'base_model\.model\.lm_head\.weight' holds full weights of a module "
                    "outside the vision tower"),
    }
    saved = tmp_path / "lm-head-listed"
    shutil.copytree(own["merger"], saved)
    config = json.loads((saved / ADAPTER_CONFIG).read_text())
    (saved / ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": [*config["modules_to_save"],
                                                                                   "lm_head"]}))
    cases["lm-head-listed"] = (saved, "modules_to_save 'lm_head' is outside the vision tower")
    engine = ServingEngine.from_model_dir(model_dirs[family_name], EngineConfig(max_total_tokens=256))
    try:
        for name, (path, pattern) in cases.items():
            request = EngineRequest([Message(role="user", parts=[TextPart("hi")])],
                                    SamplingParams(max_new_tokens=2), adapter_id=name, adapter_locator=str(path))
            with pytest.raises(AdapterError, match=pattern):
                asyncio.run(engine.generate(request))
        good = _request(0, "merger", own, ((28, 28),))  # the engine goes on serving
        assert asyncio.run(engine.generate(good)).completion_tokens > 0
    finally:
        engine.close()


def test_a_chunked_prefill_encodes_each_chunk_s_images_with_the_row_s_adapter(model_dirs, adapters):
    from tests.serving.test_engine_chunked import _long

    model_dir, adapter = model_dirs["qwen3-vl"], adapters["qwen3-vl"]["vit"]
    request = _long(1, adapter)  # two images, chunks of 16 tokens: each image in its own chunk
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(prefill_chunk_tokens=16, max_total_tokens=1024))
    try:
        result = asyncio.run(engine.generate(request))
    finally:
        engine.close()
    assert engine.vision.stats.passes == 2 and engine.vision.stats.max_runs == 1  # one adapter pass per chunk image
    assert result.token_ids == _transformers_alone("qwen3-vl", model_dir, adapter, request)


@pytest.mark.parametrize("device", DEVICES)
def test_vision_adapters_run_on_the_device_and_their_device_copies_are_bounded(device, model_dirs, adapters):
    """On each device: a GPU encodes an image with a device copy of its adapter's vision weights, kept while the
    copies fit ``vision_adapter_bytes`` (here 1 byte: only the newest is kept, the merger's copy is dropped for the
    ViT adapter's). Greedy
    tokens equal peft's ``generate`` of each request alone on the same device, and no op computes off it."""
    from tests.devices import DeviceRecorder
    from tests.serving.test_engine_devices import _reference
    from tests.serving.test_engine_faults import _finish

    family_name = "qwen2.5-vl"
    model_dir, own = model_dirs[family_name], adapters[family_name]
    rows = [("merger", ((56, 84),)), ("vit", ((84, 28),)), (None, ((56, 56),)), ("merger", ((28, 56),))]
    requests = [_request(i, kind, own, sizes) for i, (kind, sizes) in enumerate(rows)]
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(device=device, max_total_tokens=512,
                                                                  vision_adapter_bytes=1))
    engine.config_dir = model_dir
    try:
        seqs = [engine._prepare(r, time.perf_counter()) for r in requests]
        with DeviceRecorder(device) as recorder:
            engine._step(seqs)
            _finish(engine)
        assert not recorder.left, f"ops computed off {device} from its tensors: {sorted(set(recorder.left))}"
        assert all(s.state.done and not s.failed for s in seqs)
        assert len(engine.vision.copies) <= 1 and engine.vision.stats.passes >= 2
        expected = [_reference(engine, r, own[kind] if kind else None) for (kind, _), r in zip(rows, requests,
                                                                                               strict=True)]
        assert [s.state.tokens for s in seqs] == expected
    finally:
        engine.close()


def test_device_copies_are_bounded_by_bytes_least_recently_used_first(model_dirs, adapters):
    """``DeviceCopies`` on a device other than the host's (the meta device stands in for a GPU here: the copies'
    sizes are real, their contents are not needed): copies are reused, the least recently used is dropped once the
    bytes pass the bound, the newest is kept even alone above it, a copy whose host weights are gone is dropped,
    and weights already on the device are their own copy."""
    family_name = "qwen2.5-vl"
    family, model_dir, own = get_family(family_name), model_dirs[family_name], adapters[family_name]
    model = family.load_model(model_dir)
    host = {kind: load_lora_weights(own[kind], kind, model, family).vision for kind in ("vit", "merger", "vision-only")}
    size = {kind: weights.nbytes for kind, weights in host.items()}
    meta = torch.device("meta")

    copies = DeviceCopies(size["vit"] + max(size["merger"], size["vision-only"]))  # two copies, never three
    vit = copies.get(host["vit"], meta)
    assert vit is not host["vit"] and next(iter(vit.lora.values()))[0].device == meta
    assert copies.get(host["merger"], meta) is not None and copies.nbytes == size["vit"] + size["merger"]
    assert copies.get(host["vit"], meta) is vit  # reused, and now the most recently used
    copies.get(host["vision-only"], meta)  # over the bound: the merger's copy (least recently used) goes
    assert copies.nbytes <= copies.max_bytes and len(copies) == 2
    assert copies.get(host["vit"], meta) is vit
    assert copies.get(host["merger"], meta) is not None and copies.nbytes == size["vit"] + size["merger"]  # vision-only went

    tiny = DeviceCopies(1)
    for kind in host:
        tiny.get(host[kind], meta)
        assert len(tiny) == 1 and tiny.nbytes == size[kind]  # only the newest, even above the bound

    roomy = DeviceCopies(1 << 40)
    roomy.get(host["vit"], meta)
    del host["vit"]
    gc.collect()
    roomy.get(host["merger"], meta)
    assert len(roomy) == 1 and roomy.nbytes == size["merger"]  # the orphaned copy is gone
    assert roomy.get(host["merger"], torch.device("cpu")) is host["merger"]
