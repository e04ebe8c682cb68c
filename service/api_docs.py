"""The interactive API docs (``/docs``, Swagger UI) served with no network access beyond the API itself.

FastAPI's default page loads Swagger UI's script and styles from a CDN, so on a cluster without internet access it
renders blank. ``install_docs`` follows FastAPI's self-hosting recipe (the app is created with ``docs_url=None``):
the assets come from the installed ``fastapi-offline`` package (Swagger UI 5 bundle and CSS, a favicon), mounted at
``STATIC_PATH``; the page points at them, and Swagger UI's online validator badge is off, so it asks nothing of
any other host (tests/browser checks it with every other host blocked). ``/redoc`` is not served: ReDoc's bundle
still loads its logo from its CDN. These paths are outside ``/v1/``, so the admission middleware lets them through
without a key (like ``/openapi.json``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

DOCS_PATH, STATIC_PATH = "/docs", "/static/docs"


def assets_dir() -> Path:
    """The folder of the installed Swagger UI assets."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, its OAuth2 redirect page and the static assets to ``app``."""
    app.mount(STATIC_PATH, StaticFiles(directory=assets_dir()), name="docs-static")
    redirect = app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect}" if redirect else None,
            swagger_js_url=f"{root}{STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None})  # no online check

    if redirect:
        @app.get(redirect, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()
