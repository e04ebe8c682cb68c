"""The tracking UI and the API docs as a person sees them: headless Chromium (Debian's package, /usr/bin/chromium,
installed by ``make chromium``) driven by Playwright, against a real ``mlflow server --app-name basic-auth``
configured as the platform configures it and the real API served by uvicorn.

One finished run per tenant, made the cheapest honest way (``tests.service.mlflow_jobs.track_job``: the scheduler
launches the job and writes its spec, the workflow's ``MlflowTracker`` logs it as a job's rank 0 does). Tenant A's
read-only MLflow login opens its experiment in the model-training view, sees its run with the dataset in the runs
table, the loss chart and the datasets on the run page, and does not see tenant B's experiment. Then ``/docs``
renders Swagger UI with every request to anything but 127.0.0.1 / localhost aborted. Screenshots go to the test's
tmp dir (printed on failure).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from service import repository as repo
from tests.fixtures.net import free_port, wait_for_port
from tests.service.helpers import auth
from tests.service.mlflow_jobs import STEPS, new_tenant, processed_file, track_job, tracked_app

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# The flags Chromium needs on these machines (headless, as root, on a closed network: no background connections).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium; install it with `make "
                    "chromium` (apt-get install chromium), which the README's `make test` runs first")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def api(mlflow_auth_server, tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The API under uvicorn (a thread of this process), two tenants, one finished tracked run each."""
    import uvicorn

    app = tracked_app(tmp_path_factory.mktemp("browser-api"), tiny_model_dir, mlflow_auth_server)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=60)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            ctx = app.state.ctx
            world: dict[str, Any] = {"url": url, "mlflow": mlflow_auth_server.uri}
            for name in ("ui-a", "ui-b"):
                tenant = new_tenant(client, name)
                tenant_id = tenant["tenant"]["id"]
                train = processed_file(ctx, tenant_id, "shapes-train.jsonl")
                val = processed_file(ctx, tenant_id, "shapes-val.jsonl", [{"messages": [
                    {"role": "user", "content": "held out"}, {"role": "assistant", "content": "yes"}]}] * 3)
                job = client.post("/v1/fine_tuning/jobs", headers=auth(tenant["key"]["key"]), json={
                    "model": "qwen-vl-tiny", "training_file": train, "validation_file": val})
                assert job.status_code == 200, job.text
                _spec, run_id = track_job(ctx, job.json()["id"], mlflow_auth_server)
                with ctx.sessions() as s:
                    sha256 = repo.file_by_id(s, file_id=train).sha256
                world[name] = {"tenant": tenant, "job": job.json()["id"], "run": run_id, "train": train,
                               "train_sha256": sha256}
            yield world
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _tenant_context(browser: Any, login: dict[str, str]) -> Any:
    """A browser context logged in (HTTP basic auth, as MLflow's basic-auth app asks) as a tenant's MLflow user."""
    context = browser.new_context(http_credentials={"username": login["username"], "password": login["password"]},
                                  viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    return context


def test_tenant_sees_its_run_with_dataset_and_loss_chart(browser, api, tmp_path: Path) -> None:
    a = api["ui-a"]
    login = a["tenant"]["mlflow"]
    page = _tenant_context(browser, login).new_page()
    try:
        # the link the API handed out opens the experiment in MLflow's model-training view (not GenAI traces)
        page.goto(login["experiment_url"])
        page.get_by_role("link", name="Model registry").wait_for()  # a sidebar entry of that view only
        runs = page.get_by_role("grid")  # tenant A's experiment has this one run
        runs.get_by_role("link", name=a["job"]).wait_for()
        runs.get_by_text(a["train"]).wait_for()  # the runs table's Dataset column: the training file
        page.screenshot(path=str(tmp_path / "runs.png"))

        runs.get_by_role("link", name=a["job"]).click()  # the run page
        datasets = page.get_by_role("heading", name="Datasets", exact=True).locator("xpath=..")
        datasets.get_by_text(f"{a['train']} ({a['train_sha256'][:32]})").wait_for()  # name (digest)
        assert datasets.get_by_text("training", exact=True).is_visible()  # its context (shown capitalised)
        page.get_by_text("qwenvl.base_model").wait_for()
        assert page.get_by_test_id("note-editor-preview-content").inner_text().startswith(
            f"Fine-tuning job {a['job']}: qwen-vl-tiny on training file {a['train']}")
        page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

        page.get_by_role("tab", name="Model metrics").click()
        card = page.get_by_test_id("draggable-chart-cards-grid").locator(":scope > *").filter(
            has=page.get_by_text("train_loss", exact=True))
        line = card.locator(".js-plotly-plot .scatterlayer path.js-line").first
        line.wait_for()  # plotly drew the loss curve
        assert line.get_attribute("d").count("L") + 1 == STEPS  # through one point per logged step
        page.screenshot(path=str(tmp_path / "metrics.png"), full_page=True)
    finally:
        page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        print(f"screenshots in {tmp_path}")


def test_tenant_does_not_see_the_other_tenants_experiment(browser, api, tmp_path: Path) -> None:
    a, b = api["ui-a"], api["ui-b"]
    login, theirs = a["tenant"]["mlflow"], b["tenant"]["mlflow"]
    context = _tenant_context(browser, login)
    page = context.new_page()
    try:
        page.goto(f"{api['mlflow']}/#/experiments?workflowType=machine_learning")
        page.get_by_role("link", name=login["experiment_name"]).wait_for()
        assert page.get_by_text(theirs["experiment_name"]).count() == 0
        page.screenshot(path=str(tmp_path / "experiments.png"))

        with page.expect_response(lambda r: "/experiments/get" in r.url) as answer:
            page.goto(theirs["experiment_url"])
        assert answer.value.status == 403, answer.value.text()
        page.screenshot(path=str(tmp_path / "other.png"))
        assert page.get_by_text(b["job"]).count() == 0
        search = f"{api['mlflow']}/ajax-api/2.0/mlflow/runs/search"
        hidden = context.request.post(search, data={"experiment_ids": [theirs["experiment_id"]]})
        assert hidden.ok and "runs" not in hidden.json(), hidden.text()  # MLflow drops what it may not read
        mine = context.request.post(search, data={"experiment_ids": [login["experiment_id"]]})
        assert [r["info"]["run_id"] for r in mine.json()["runs"]] == [a["run"]]
    finally:
        page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        print(f"screenshots in {tmp_path}")


def test_api_docs_render_offline(browser, api, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    aborted: list[str] = []

    def only_local(route: Any) -> None:
        if urlparse(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            aborted.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    try:
        page.goto(f"{api['url']}/docs")
        page.locator(".opblock", has_text="/v1/fine_tuning/jobs").first.wait_for()  # Swagger UI drew the operations
        assert page.locator(".swagger-ui .info .title").inner_text().startswith("Qwen-VL platform API")
        page.screenshot(path=str(tmp_path / "docs.png"))
        assert aborted == []  # it asked for nothing outside the API
        outside = page.evaluate("fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css')"
                                ".then(() => 'fetched', () => 'blocked')")
        assert outside == "blocked" and aborted, "the route interception must block the outside world"
    finally:
        print(f"screenshots in {tmp_path}")
