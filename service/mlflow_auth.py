"""The MLflow server's authorization function: tenant logins are read-only.

MLflow's basic-auth app lets any authenticated user create experiments, registered models, prompts, datasets,
webhooks, ... (its creation checks only look for an explicit ``DENY``), so a tenant's MLflow login could store
unlimited artifacts outside every quota. The auth config (``basic_auth_ini``) names this module's
``authenticate`` as its ``authorization_function``; the auth app calls it first for every request, Flask routes
and FastAPI routes alike, and returns whatever ``Response`` it gives. It authenticates with MLflow's own basic
auth, lets the MLflow admin (the platform: provisioning, training jobs) do anything, and lets any other user only
read: ``GET``/``HEAD``/``OPTIONS``, the search endpoints the UI posts to, and a change of its own password. Everything
else answers 403 before MLflow's own permission checks (which still decide what a read may see: a tenant has
``READ`` on its own experiment only).

Runs inside the MLflow server process (``mlflow server --app-name basic-auth``), which imports it by name: it
imports MLflow lazily and nothing of the service.
"""

from __future__ import annotations

from typing import Any

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# POST endpoints that only read (the tracking UI and clients search with POST); matched at the end of the path,
# whatever the prefix (/api/2.0/mlflow/, /ajax-api/3.0/mlflow/, a static prefix).
READ_ONLY_POSTS = (
    "/experiments/search", "/runs/search", "/logged-models/search", "/registered-models/get-latest-versions",
    "/datasets/search", "/traces/search", "/traces/batchGetInfos", "/traces/metrics",
    "/traces/calculate-filter-correlation", "/issues/search", "/prompt-optimization/jobs/search",
    "/artifacts/presigned-download-url", "/graphql",
)
OWN_PASSWORD = "/users/update-password"  # PATCH; MLflow itself allows it only for the sender's own user
DENIED = ("Permission denied: tenant MLflow logins are read-only (they can read their own experiment); "
          "experiments, runs, registered models and everything else are created by the platform")


def tenant_may(method: str, path: str) -> bool:
    """True when a non-admin user may send ``method`` to ``path``: reading only."""
    path = path.rstrip("/")
    if method in READ_METHODS:
        return True
    if method == "POST":
        return path.endswith(READ_ONLY_POSTS)
    return method == "PATCH" and path.endswith(OWN_PASSWORD)


def authenticate() -> Any:
    """MLflow ``authorization_function``: the request's ``Authorization`` (basic auth) when it may proceed, else a
    401 (not authenticated) or 403 (a non-admin user writing) ``Response``."""
    from flask import Response, make_response, request
    from mlflow.server import auth as mlflow_auth

    authorization = mlflow_auth.authenticate_request_basic_auth()
    if isinstance(authorization, Response) or tenant_may(request.method, request.path):
        return authorization  # a 401, or a read (MLflow's permission checks decide what it may see)
    if mlflow_auth.store.get_user(authorization.username).is_admin:
        return authorization
    response = make_response(DENIED)
    response.status_code = 403
    return response
