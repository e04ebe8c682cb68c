"""The pretrained tiny bases of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``qwenvl_core/assets/<family>-tiny-seeing``, built
by ``python -m qwenvl_core.pretrain.ship --family NAME`` with ``qwenvl_core.pretrain.families``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from qwenvl_core.models.registry import get_family
from qwenvl_core.pretrain.families import RECIPES, SEEING

# The families whose pretrained base ships (its preset exists: ``materialize`` copies the asset).
FAMILIES = sorted(f for f in SEEING if SEEING[f] in get_family(f).preset_names())


@pytest.fixture(scope="module", params=FAMILIES)
def seeing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, its ``<family>-tiny-seeing`` materialised as ``qwenvl model init`` and the local stack do)."""
    from qwenvl_core.models.registry import family_for_preset

    name = SEEING[request.param]
    out = tmp_path_factory.mktemp("seeing") / name
    return request.param, family_for_preset(name).materialize(name, out)


def test_shipped_family_base_loads_strictly_and_sees(seeing: tuple[str, Path]) -> None:
    from qwenvl_core.autotune import DEFAULTS_FILE, PRETRAINED_TINY_FAMILIES, base_defaults
    from qwenvl_core.models.registry import detect_family
    from qwenvl_core.models.shipped import MANIFEST_FILE, shipped_dir
    from qwenvl_core.pretrain.recipe import evaluate_tasks

    family_name, model_dir = seeing
    manifest = json.loads((shipped_dir(SEEING[family_name]) / MANIFEST_FILE).read_text())
    for file in [*manifest["files"], MANIFEST_FILE]:  # the shipped files, copied as they are
        assert (model_dir / file).read_bytes() == (shipped_dir(SEEING[family_name]) / file).read_bytes(), file
    assert sum((model_dir / f).stat().st_size for f in manifest["files"]) < 2_000_000
    family = detect_family(model_dir)
    assert family.name.value == family_name
    model = family.forward_contract(family.load_model(model_dir))  # strict: every key, every shape
    processor = family.load_processor(model_dir)
    assert base_defaults(model_dir) == (PRETRAINED_TINY_FAMILIES[family_name], DEFAULTS_FILE)
    # Held-out rendered pictures (seed 7; the recipe trains on seed 0): the random tiny preset scores 0.00 (chance
    # 1/7; docs/pretraining.md section 6), the pretrained base reads the colour off the picture.
    scores = evaluate_tasks(model, processor, ("colour",), seed=7, n_per_task=20,
                            stop_ids=family.stop_token_ids(processor))
    assert scores["colour"] >= 0.8, scores


@pytest.mark.parametrize("family_name", FAMILIES)
def test_recipe_reproduces_a_prefix_of_the_shipped_family_run(family_name: str) -> None:
    """The suite re-runs the first ``PREFIX`` steps of each stage of the family's recipe and compares them with the
    fingerprint its build recorded (``ship --check --family NAME`` rebuilds the whole run bit for bit)."""
    from qwenvl_core.models.shipped import verify
    from qwenvl_core.pretrain.ship import PREFIX, fingerprints_match, prefix_fingerprint

    manifest = verify(SEEING[family_name])  # every shipped file matches its sha256
    assert manifest["recipe"] == json.loads(json.dumps(dataclasses.asdict(RECIPES[family_name])))
    assert manifest["prefix"]["steps"] == list(PREFIX)
    recorded = manifest["prefix"]["fingerprint"]
    assert fingerprints_match(prefix_fingerprint(RECIPES[family_name], family=family_name), recorded) == []


def test_the_prefix_comparison_tells_runs_apart() -> None:
    """Another seed's prefix differs from the recorded one in (nearly) every tensor."""
    from qwenvl_core.models.shipped import verify
    from qwenvl_core.pretrain.ship import fingerprints_match, prefix_fingerprint

    family_name = "qwen2.5-vl"
    recorded = verify(SEEING[family_name])["prefix"]["fingerprint"]
    other = prefix_fingerprint(dataclasses.replace(RECIPES[family_name], seed=1), family=family_name)
    assert len(fingerprints_match(other, recorded)) > len(recorded) // 2


def test_ship_refuses_an_unknown_family(capsys: pytest.CaptureFixture[str]) -> None:
    from qwenvl_core.errors import ConfigError
    from qwenvl_core.pretrain.families import recipe_of
    from qwenvl_core.pretrain.ship import main

    with pytest.raises(ConfigError, match="no tiny-base recipe for 'qwen-vl'; known: "):
        recipe_of("qwen-vl")
    with pytest.raises(SystemExit):
        main(["--check", "--family", "qwen4-vl"])
    assert "--family: invalid choice: 'qwen4-vl'" in capsys.readouterr().err


def test_qwen3_stage1_keeps_position_and_its_prefix_shows_it() -> None:
    """Qwen3-VL's recipe reads all merged tokens in stage 1 (``vision_warmup_pooled=False``: docs/pretraining.md
    section 7); the same recipe with the pooled stage 1 trains another tower, which the recorded prefix tells apart."""
    from qwenvl_core.models.shipped import verify
    from qwenvl_core.pretrain.ship import fingerprints_match, prefix_fingerprint

    recipe = RECIPES["qwen3-vl"]
    assert recipe.vision_warmup_pooled is False and "box" in recipe.vision_warmup_targets
    recorded = verify(SEEING["qwen3-vl"])["prefix"]["fingerprint"]
    pooled = prefix_fingerprint(dataclasses.replace(recipe, vision_warmup_pooled=True), family="qwen3-vl")
    assert any(k.startswith("model.visual.blocks.") for k in fingerprints_match(pooled, recorded))
