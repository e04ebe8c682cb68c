"""The demo's datasets (``qwenvl_cli.demo_data``): bundles the platform's validator accepts, held out from training."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from qwenvl_cli.demo_data import write_demo_dataset
from qwenvl_core.data.validate import validate_file


def _records(bundle: Path, name: str) -> list[dict]:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read(f"{name}.json"))


def test_the_line_task_is_a_valid_bundle_of_above_below_questions_held_out_from_training(tmp_path: Path) -> None:
    data = write_demo_dataset(tmp_path, n_train=24, n_validation=12, task="line")
    assert (data.train_samples, data.validation_samples) == (24, 12)
    assert data.grounding_image is None and data.validation_boxes == 0
    for bundle in (data.train_bundle, data.validation_bundle):
        report = validate_file(bundle)
        assert report.ok and report.valid_samples == (24 if bundle == data.train_bundle else 12), report.to_dict()
    train, held_out = _records(data.train_bundle, "train"), _records(data.validation_bundle, "validation")
    answers = [r["conversations"][-1]["value"] for r in train + held_out]
    assert set(answers) == {"above", "below"}
    questions = {r["conversations"][0]["value"].split("\n")[-1] for r in train}
    assert all(q.startswith("Is the ") and q.endswith(" above or below the line?") for q in questions), questions
    train_images = {zipfile.ZipFile(data.train_bundle).read(n) for n in zipfile.ZipFile(data.train_bundle).namelist()
                    if n.endswith(".png")}
    held_out_images = {zipfile.ZipFile(data.validation_bundle).read(n)
                       for n in zipfile.ZipFile(data.validation_bundle).namelist() if n.endswith(".png")}
    assert len(train_images) > 12 and not train_images & held_out_images  # different pictures


def test_an_unknown_task_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: colours, counting, line"):
        write_demo_dataset(tmp_path, task="shapes")
