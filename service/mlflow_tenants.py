"""Tenant-scoped MLflow tracking UI: each tenant gets an MLflow user that can read only its own experiment.

When ``Settings.mlflow_tracking_uri`` is set, tenant creation (``POST /v1/admin/tenants``) calls
``provision_tenant``, which talks to the MLflow server's basic-auth app (``mlflow server --app-name basic-auth``)
over its REST API with the admin credentials of ``Settings.mlflow_admin_username`` / ``_password``:

1. ``experiments/create`` (or ``experiments/get-by-name``): the tenant's experiment, named by
   ``qwenvl_core.specs.tenant_experiment_name`` so that it is the very experiment the training workflow logs into,
   tagged as a model-training experiment (``EXPERIMENT_KIND_TAG``);
2. ``users/create``: a user named after the tenant id (service-generated, so it never collides with the admin
   or another user) with a random password, returned once to the caller and never stored by the service;
3. ``users/permissions/grant`` (MLflow 3.17's unified permission API, successor of
   ``experiments/permissions/create``): ``READ`` on that experiment, nothing else.

Isolation relies on the auth app's ``default_permission = NO_PERMISSIONS`` (see ``infra/``): a user then sees
only resources granted to it. Read-only relies on its ``authorization_function`` being ``service.mlflow_auth``'s:
MLflow alone lets every user create experiments and registered models. Any MLflow failure raises ``Unavailable``
so the tenant is not created half-way. ``provision_experiment`` does steps 1 and 3 for another experiment of the
tenant's namespace (a job's ``mlflow`` integration, ``service.integrations``).

MLflow 3.17.2's UI does not choose its view from that tag: it opens every experiment in the view of its global
"GenAI / Model training" switch, which comes from the URL's ``workflowType`` parameter, else the browser's saved
choice, else GenAI (traces: "no traces" for a training run). So the tenant also gets ``experiment_url``
(``experiment_ui_url``), which opens the experiment's training runs (datasets, metric charts) directly.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from qwenvl_core.specs import EXPERIMENT_KIND_MODEL_TRAINING, EXPERIMENT_KIND_TAG, tenant_experiment_name
from service.errors import Unavailable
from service.settings import Settings

EXPERIMENT_PERMISSION = "READ"
_EXISTS = "RESOURCE_ALREADY_EXISTS"
_MISSING = "RESOURCE_DOES_NOT_EXIST"


AUTHORIZATION_FUNCTION = "service.mlflow_auth:authenticate"  # tenant logins read-only (service/mlflow_auth.py)


def basic_auth_ini(database: str | Path, admin_username: str, admin_password: str) -> str:
    """The config of MLflow's basic-auth app (``MLFLOW_AUTH_CONFIG_PATH``): nobody may read anything unless
    granted, which is what makes per-tenant experiment permissions meaningful, and nobody but the admin may write
    anything (``AUTHORIZATION_FUNCTION``)."""
    return (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{database}\n"
        f"admin_username = {admin_username}\n"
        f"admin_password = {admin_password}\n"
        f"authorization_function = {AUTHORIZATION_FUNCTION}\n"
    )


@dataclass(frozen=True)
class TenantMlflowAccess:
    """What a tenant needs to open the tracking UI; ``password`` is shown once."""

    tracking_uri: str
    username: str
    password: str
    experiment_id: str
    experiment_name: str
    experiment_url: str


def experiment_ui_url(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment in its model-training view (its runs with their datasets and charts)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class MlflowAdmin:
    """The MLflow REST calls tenant provisioning needs, authenticated as the MLflow admin."""

    def __init__(self, tracking_uri: str, username: str, password: str, timeout_s: float = 10.0) -> None:
        self.base = tracking_uri.rstrip("/")
        self._client = httpx.Client(auth=(username, password), timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, f"{self.base}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"MLflow server at {self.base} unreachable: {exc}", code="mlflow_unavailable") from exc

    def _ok(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code != 200:
            raise Unavailable(f"MLflow {what} failed ({response.status_code}): {response.text[:300]}",
                              code="mlflow_error")
        return response.json() if response.content else {}

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created when it does not exist yet; tagged as a model-training one."""
        kind = {"key": EXPERIMENT_KIND_TAG, "value": EXPERIMENT_KIND_MODEL_TRAINING}
        created = self._call("POST", "/api/2.0/mlflow/experiments/create", json={"name": name, "tags": [kind]})
        if created.status_code == 200:
            return str(created.json()["experiment_id"])
        if _EXISTS not in created.text:
            self._ok(created, f"experiments/create {name!r}")
        found = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        experiment = self._ok(found, f"experiments/get-by-name {name!r}")["experiment"]
        experiment_id = str(experiment["experiment_id"])
        if {"key": EXPERIMENT_KIND_TAG, "value": EXPERIMENT_KIND_MODEL_TRAINING} not in experiment.get("tags", []):
            self._ok(self._call("POST", "/api/2.0/mlflow/experiments/set-experiment-tag",
                                json={"experiment_id": experiment_id, **kind}), f"set-experiment-tag on {name!r}")
        return experiment_id

    def create_user(self, username: str, password: str) -> None:
        response = self._call("POST", "/api/2.0/mlflow/users/create",
                              json={"username": username, "password": password})
        self._ok(response, f"users/create {username!r}")

    def grant_experiment(self, username: str, experiment_id: str, permission: str, *, existing_ok: bool = False,
                         missing_user_ok: bool = False) -> None:
        """Grant ``permission`` on the experiment; ``existing_ok``: a grant already there is fine;
        ``missing_user_ok``: a user that does not exist is skipped (a tenant created before MLflow was set up)."""
        body = {"username": username, "resource_type": "experiment", "resource_id": experiment_id,
                "permission": permission}
        response = self._call("POST", "/api/3.0/mlflow/users/permissions/grant", json=body)
        if (existing_ok and _EXISTS in response.text) or (missing_user_ok and _MISSING in response.text):
            return
        self._ok(response, f"users/permissions/grant {permission} on experiment {experiment_id}")


def admin_from_settings(settings: Settings) -> MlflowAdmin | None:
    """An ``MlflowAdmin`` for the configured server, or None when MLflow provisioning is off."""
    if not settings.mlflow_tenants_enabled:
        return None
    assert settings.mlflow_tracking_uri and settings.mlflow_admin_username and settings.mlflow_admin_password
    return MlflowAdmin(settings.mlflow_tracking_uri, settings.mlflow_admin_username,
                       settings.mlflow_admin_password.get_secret_value(), settings.mlflow_timeout_s)


def provision_tenant(settings: Settings, tenant_id: str) -> TenantMlflowAccess | None:
    """Create the tenant's experiment and read-only MLflow user; None when MLflow provisioning is off."""
    admin = admin_from_settings(settings)
    if admin is None:
        return None
    try:
        name = tenant_experiment_name(tenant_id)
        experiment_id = admin.ensure_experiment(name)
        password = secrets.token_urlsafe(24)
        admin.create_user(tenant_id, password)
        admin.grant_experiment(tenant_id, experiment_id, EXPERIMENT_PERMISSION)
    finally:
        admin.close()
    assert settings.mlflow_tracking_uri is not None
    return TenantMlflowAccess(tracking_uri=settings.mlflow_tracking_uri, username=tenant_id, password=password,
                              experiment_id=experiment_id, experiment_name=name,
                              experiment_url=experiment_ui_url(settings.mlflow_tracking_uri, experiment_id))


def provision_experiment(settings: Settings, tenant_id: str, experiment: str) -> str | None:
    """Experiment ``<tenant>/<experiment>`` exists, is a model-training experiment and the tenant's MLflow user may
    read it; its id (None when MLflow provisioning is off). Idempotent."""
    admin = admin_from_settings(settings)
    if admin is None:
        return None
    try:
        experiment_id = admin.ensure_experiment(tenant_experiment_name(tenant_id, experiment))
        admin.grant_experiment(tenant_id, experiment_id, EXPERIMENT_PERMISSION, existing_ok=True,
                               missing_user_ok=True)
    finally:
        admin.close()
    return experiment_id
