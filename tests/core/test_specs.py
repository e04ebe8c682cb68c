"""``qwenvl_core.specs``: every float setting refuses infinity and NaN; measurements (``Progress``) keep them."""

from __future__ import annotations

import inspect
import math

import pytest
from pydantic import ValidationError

from qwenvl_core import specs


def _float_settings() -> list[tuple[type[specs._Spec], str]]:
    found = []
    for _name, cls in inspect.getmembers(specs, inspect.isclass):
        if issubclass(cls, specs._Spec) and cls is not specs._Spec and cls is not specs.Progress:
            found += [(cls, field) for field, info in cls.model_fields.items() if "float" in str(info.annotation)]
    return found


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(("cls", "field"), _float_settings(), ids=lambda x: getattr(x, "__name__", x))
def test_every_float_setting_refuses_inf_and_nan(cls: type[specs._Spec], field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        cls.model_validate({field: value})
    assert any(e["loc"] == (field,) and e["type"] == "finite_number" for e in info.value.errors()), info.value


def test_a_job_spec_names_the_infinite_field() -> None:
    base = {"job_id": "j", "base_model": "m", "train_file": "t.jsonl", "output_uri": "/tmp/o"}
    for nested, loc in (({"lora": {"alpha": math.inf}}, ("lora", "alpha")),
                        ({"evaluation": {"early_stopping": {"min_delta": math.inf}}},
                         ("evaluation", "early_stopping", "min_delta"))):
        with pytest.raises(ValidationError) as info:
            specs.FineTuneJobSpec.model_validate({**base, **nested})
        assert [e["loc"] for e in info.value.errors()] == [loc]
    assert specs.FineTuneJobSpec.model_validate({**base, "lora": {"alpha": 1e300}}).lora.alpha == 1e300
    names = {f"{cls.__name__}.{field}" for cls, field in _float_settings()}  # the parametrization found them
    assert {"LoraSpec.alpha", "EarlyStopping.min_delta", "Hyperparameters.learning_rate", "ComputeSpec.gpus_per_worker",
            "DpoSpec.beta"} <= names
    # measurements are not settings: a diverged run still reports its loss
    progress = specs.Progress(step=3, total_steps=10, epoch=0.3, loss=math.nan, eta_seconds=math.inf,
                              metrics={"reward_margin": -math.inf})
    assert math.isnan(progress.loss or 0.0) and progress.eta_seconds == math.inf
