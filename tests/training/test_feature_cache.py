"""The frozen vision tower's feature cache: same features, bounded memory, refused for a training tower and for a
tower whose rows are not images, and a two-epoch fine-tune that reuses it ends with the adapter of a run without
it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qwenvl_core.models.registry import get_family
from qwenvl_core.training import Trainer
from qwenvl_core.training.feature_cache import ImageFeatureCache
from tests.training.conftest import make_spec


@pytest.fixture(scope="module")
def tower(tiny_model_dir):
    return get_family("qwen-vl").vision_tower(get_family("qwen-vl").load_model(tiny_model_dir).eval())


def test_cached_features_equal_the_towers_and_the_budget_bounds_admission(tower):
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tower(images)
    per_image = expected[0].numel() * expected[0].element_size()
    tower.requires_grad_(False)
    cache = ImageFeatureCache(budget_bytes=2 * per_image)
    cache.install(tower)
    first = tower(images)
    again = tower(images[[2, 0, 1]])  # two of them cached; the third was not admitted (budget full)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    assert cache.stats() == {"hits": 2, "misses": 4, "hit_rate": 2 / 6, "images": 2, "bytes": 2 * per_image}


def test_a_tower_that_trains_is_refused(tiny_model_dir):
    family = get_family("qwen-vl")
    tower = family.vision_tower(family.load_model(tiny_model_dir))
    with pytest.raises(ValueError, match="vision tower trains"):
        ImageFeatureCache(1 << 20).install(tower)


def test_a_tower_that_needs_more_than_per_image_pixels_is_refused(tower):
    """transformers' Qwen2-VL family tower takes the patches of all images plus grid_thw: rows are not images, so
    per-row caching would be wrong; the trainer skips the cache for it (``supports``), ``install`` refuses it."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    patches_tower = Qwen2VisionTransformerPretrainedModel(
        Qwen2VLVisionConfig(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2)).requires_grad_(False)
    assert ImageFeatureCache.supports(tower) and not ImageFeatureCache.supports(patches_tower)
    with pytest.raises(ValueError, match="more than one image per row of pixel_values"):
        ImageFeatureCache(1 << 20).install(patches_tower)


def test_two_epochs_with_the_cache_end_with_the_adapter_of_a_run_without_it(tiny_model_dir, synth_data, tmp_path):
    runs = {}
    for name, megabytes in (("cached", 64), ("uncached", 0)):
        spec = make_spec(tiny_model_dir, synth_data, tmp_path / name, validation_file=None,
                         hyperparameters={"max_steps": None, "n_epochs": 2, "batch_size": 8, "micro_batch_size": 8},
                         compute={"image_feature_cache_mb": megabytes}, checkpoint={"every_n_steps": 1000})
        runs[name] = Trainer(spec, work_dir=tmp_path / f"w-{name}").run()
    cached = runs["cached"].summary["image_feature_cache"]
    assert runs["uncached"].summary["image_feature_cache"] is None
    assert cached["misses"] == cached["images"] > 0 and cached["hits"] >= cached["misses"]  # epoch 2 all hits
    expected = load_file(runs["uncached"].adapter_dir / "adapter_model.safetensors")
    got = load_file(runs["cached"].adapter_dir / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
