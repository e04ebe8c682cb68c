"""Fixtures for serving tests: tiny LoRA adapters that really change the outputs, and a running engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qwenvl_core.models.registry import get_family


def save_random_lora(model: torch.nn.Module, targets: list[str], out_dir: Path, seed: int, rank: int = 8) -> Path:
    """``model`` with a random LoRA adapter (non-zero B) of ``rank`` on ``targets``, saved by peft to ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # stronger than peft's random init, so different adapters pick different tokens
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """A random (non-zero B) LoRA adapter on v1's official targets, saved as a PEFT directory."""
    family = get_family("qwen-vl")
    return save_random_lora(family.load_model(model_dir), list(family.default_lora_targets), out_dir, seed, rank)


def make_family_adapter(family_name: str, model_dir: Path, out_dir: Path, seed: int) -> Path:
    """A random LoRA adapter (non-zero B) on a transformers family's official language-model targets, saved by
    peft."""
    from qwenvl_core.specs import TargetPreset
    from qwenvl_core.training.lora import resolve_targets

    family = get_family(family_name)
    model = family.load_model(model_dir)
    return save_random_lora(model, resolve_targets(model, family, TargetPreset.OFFICIAL), out_dir, seed)


@pytest.fixture(scope="session")
def family_adapter_dirs(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """``{transformers family: two adapters (seeds 1, 2) of its tiny model}``. Read-only."""
    root = tmp_path_factory.mktemp("family-adapters")
    return {name: [make_family_adapter(name, model_dir, root / f"{name}-a{k}", seed=k + 1) for k in range(2)]
            for name, model_dir in tiny_dirs.items()}


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ten adapters (seeds 1..10), adapter 9 with rank 4 (mixed ranks in one batch)."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i + 1, rank=4 if i == 9 else 8) for i in range(10)]


@pytest.fixture
def engine_factory(tiny_model_dir: Path) -> Iterator[object]:
    """Build engines on the tiny model; all are closed after the test."""
    from prometheus_client import CollectorRegistry

    from qwenvl_core.serving.engine import EngineConfig, ServingEngine
    from qwenvl_core.serving.metrics import ServingMetrics

    engines: list[ServingEngine] = []

    def build(**overrides: object) -> ServingEngine:
        metrics = ServingMetrics(CollectorRegistry())
        engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(**overrides), metrics=metrics)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def eventually(condition: object, timeout: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` s (the model thread finishes its step after
    its last event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
