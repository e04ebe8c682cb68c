"""A job whose files are bundles (.zip / .tar.gz with their images) extracts them into its own work folder, the
volume the operator gave jobs (``QWENVL_WORK_DIR`` on a Ray node), not into the system's temporary folder, which on
a node is often a small one shared by every job; and a bundle that cannot be opened fails the job naming the field."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from qwenvl_core.data import DataError, write_synth_dataset
from qwenvl_core.specs import JobState
from qwenvl_core.training import Hooks, Trainer
from tests.training.conftest import make_spec


def _extracted(folder: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[0] for p in folder.glob("qwenvl-bundle-*"))


def test_a_jobs_bundles_are_extracted_into_its_work_folder_not_the_system_temp(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    data = write_synth_dataset(tmp_path / "data", n=24, seed=0, val_fraction=0.25, bundles=True)
    system_temp, work = tmp_path / "system-temp", tmp_path / "work"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))  # what tempfile.gettempdir() answers
    seen: list[tuple[list[str], list[str]]] = []
    spec = make_spec(tiny_model_dir, data, tmp_path / "run", train_file=str(data.train_bundle),
                     validation_file=str(data.validation_bundle), hyperparameters={"max_steps": 2})
    hooks = Hooks(on_step=[lambda step: seen.append((_extracted(work), _extracted(system_temp)))])
    result = Trainer(spec, hooks, work_dir=work).run()
    assert result.state is JobState.SUCCEEDED
    assert seen and all(pair == (["qwenvl-bundle"] * 2, []) for pair in seen), seen  # train and validation
    assert _extracted(work) == [] and _extracted(system_temp) == []  # removed when the job's data is closed


def test_a_bundle_that_cannot_be_opened_fails_the_job_naming_the_field(tiny_model_dir, synth_data, tmp_path):
    broken = tmp_path / "train.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip archive")
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", train_file=str(broken))
    with pytest.raises(DataError, match=r"^train_file: train\.zip is not valid \(.*zip"):
        Trainer(spec, work_dir=tmp_path / "work").run()
