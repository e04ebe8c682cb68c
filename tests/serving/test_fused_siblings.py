"""``fused_siblings``: the language model's sibling layers (v1's ``w1`` / ``w2``, the newer families' q / k / v and
gate / up) computed by one matmul per group give the logits the separate layers gave, for every family; the members'
weights are views of the group's; a member called on its own input still computes its own layer; nothing is held
between forwards; a Q-LoRA base and the vision tower are left as they are; the engine fuses its model as
``EngineConfig.fuse_siblings`` says."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from qwenvl_core.serving.fused_siblings import FUSED, fuse_sibling_linears
from tests.devices import DEVICES

FAMILIES = ["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def _model_dir(name: str, tiny_model_dir: Path, tiny_dirs: dict[str, Path]) -> Path:
    return tiny_model_dir if name == "qwen-vl" else tiny_dirs[name]


def _load(name: str, model_dir: Path) -> torch.nn.Module:
    family = get_family(name)
    return family.forward_contract(family.load_model(model_dir)).eval()


def _inputs(name: str, model_dir: Path) -> dict[str, torch.Tensor]:
    """One chat with an image through the family's processor, as the model's forward takes it."""
    processor = get_family(name).load_processor(model_dir)
    message = Message(role="user", parts=[ImagePart(Image.new("RGB", (56, 84), (200, 30, 10))),
                                          TextPart("What colour is the shape?")])
    encoded = processor.encode_chat([message])
    assert encoded.vision is not None
    return {"input_ids": torch.tensor([encoded.input_ids]), **encoded.vision.as_kwargs()}


def _members(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, FUSED)}


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_groups_give_the_logits_of_the_separate_layers(name: str, tiny_model_dir: Path,
                                                             tiny_dirs: dict[str, Path]) -> None:
    model_dir = _model_dir(name, tiny_model_dir, tiny_dirs)
    family, inputs = get_family(name), _inputs(name, model_dir)
    reference, fused = _load(name, model_dir), _load(name, model_dir)
    layers = len([m for n, m in reference.named_modules() if n.endswith(family.lora_siblings()[0][0])
                  and family.component_of(n + ".weight") == "language"])
    assert fuse_sibling_linears(fused, family) == layers * len(family.lora_siblings())
    members = _members(fused)
    assert len(members) == layers * sum(len(group) for group in family.lora_siblings())
    assert all(family.component_of(n + ".weight") == "language" for n in members)  # never the vision tower
    with torch.no_grad():
        expected, got = reference(**inputs).logits, fused(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the members' weights are views of their group's, whose values are the layers' own
    state = dict(reference.named_parameters())
    for member_name, member in members.items():
        group = getattr(member, FUSED)
        assert member.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
        assert torch.equal(member.weight, state[member_name + ".weight"])
    assert fuse_sibling_linears(fused, family) == 0  # fused once (a second engine over the same model)


def test_a_member_on_its_own_input_computes_its_own_layer_and_nothing_is_held(tiny_dirs: dict[str, Path]) -> None:
    family = get_family("qwen2.5-vl")
    model = _load("qwen2.5-vl", tiny_dirs["qwen2.5-vl"])
    fuse_sibling_linears(model, family)
    attn = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x, y = torch.randn(2, 3, q.in_features), torch.randn(2, 3, q.in_features)

    def own(layer: torch.nn.Linear, inp: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(inp, layer.weight, layer.bias)

    with torch.no_grad():
        torch.testing.assert_close(k(y), own(k, y))  # out of order: not the group's first member
        q_x = q(x)
        torch.testing.assert_close(k(y), own(k, y))  # another input between the members of x
        torch.testing.assert_close(q_x, own(q, x))
        torch.testing.assert_close(v(x), own(v, x))
        held = weakref.ref(x)
        q(x), k(x), v(x)
    del x, q_x
    gc.collect()
    assert held() is None  # the last member dropped the group's input and product


def test_a_quantized_base_is_left_as_it_is(tiny_model_dir: Path) -> None:
    from qwenvl_core.training.lora import quantize_language_model

    family = get_family("qwen-vl")
    model = _load("qwen-vl", tiny_model_dir)
    quantize_language_model(model, family, torch.float32)
    assert fuse_sibling_linears(model, family) == 0 and _members(model) == {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_the_engine_fuses_its_model_as_configured(tiny_model_dir: Path, setting: str, device: str) -> None:
    """``EngineConfig.fuse_siblings``: "auto" fuses on a GPU only (on this CPU the fused matmuls ran slower); the
    group's weights stay on the engine's device."""
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_batch_size=2, fuse_siblings=setting,
                                                                       device=device))
    try:
        fused = setting == "on" or (setting == "auto" and device == "cuda")
        members = _members(engine.model)
        assert {n.rsplit(".", 1)[-1] for n in members} == ({"w1", "w2"} if fused else set())
        assert all(getattr(m, FUSED).weight.device.type == device for m in members.values())
    finally:
        engine.close()


def test_an_unknown_setting_is_refused(tiny_model_dir: Path) -> None:
    from qwenvl_core.errors import QwenVLError

    with pytest.raises(QwenVLError, match="fuse_siblings 'yes': expected 'auto', 'on' or 'off'"):
        ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(fuse_siblings="yes"))  # type: ignore[arg-type]


def test_a_refused_config_leaves_the_model_as_it_was(tiny_model_dir: Path) -> None:
    """Every setting is checked before the engine changes the model in place: a bad one beside ``fuse_siblings="on"``
    leaves a model the caller shares (a second engine over it, as the benchmarks build) unfused."""
    from qwenvl_core.errors import QwenVLError

    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_batch_size=2, fuse_siblings="off"))
    try:
        for bad in ({"lora_decode": "fast"}, {"decode_graphs": "always"}, {"decode_graph_attend_step": 0},
                    {"prefill_chunk_tokens": -1}, {"max_batch_size": 0}):
            with pytest.raises(QwenVLError, match=next(iter(bad))):
                ServingEngine(engine.model, engine.processor, engine.family,
                              EngineConfig(**{"max_batch_size": 2, "fuse_siblings": "on", **bad}))  # type: ignore[arg-type]
            assert not _members(engine.model), bad
    finally:
        engine.close()
