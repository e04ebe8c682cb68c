"""Compatibility proof: the official ``openai`` client, unchanged, drives the API served by uvicorn.

No Ray cluster here: jobs validate and queue, which is enough for create / retrieve / list / cancel / events.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.service.conftest import ApiServer, server_env
from tests.service.helpers import SAMPLES, jsonl, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[ApiServer, Path]]:
    root = tmp_path_factory.mktemp("openai")
    srv = ApiServer(server_env(root / "data", tiny_model_dir, None), root / "api.log")
    srv.start()
    yield srv, root / "data"
    srv.stop()


def test_official_client_end_to_end(server: tuple[ApiServer, Path], tmp_path: Path) -> None:
    srv, data_dir = server
    client = openai.OpenAI(api_key=(data_dir / "api_key").read_text().strip(), base_url=f"{srv.url}/v1",
                           max_retries=0)
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(SAMPLES))
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == path.stat().st_size
    job = client.fine_tuning.jobs.create(model="qwen-vl-tiny", training_file=uploaded.id, suffix="compat", seed=3,
                                         method={"type": "supervised",
                                                 "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job.status == "validating_files" and job.seed == 3
    queued = wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).model_dump(),
                      lambda d: d["status"] != "validating_files", timeout=60)
    assert queued["status"] == "queued" and queued["hyperparameters"]["n_epochs"] == 2
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5)]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=10)
    assert events.data[0].message == "Job cancelled" and events.data[0].object == "fine_tuning.job.event"
    assert "qwen-vl-tiny" in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert err.value.body["param"] == "fine_tuning_job_id"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", base_url=f"{srv.url}/v1", max_retries=0).models.list()
