"""A small httpx client for the platform's REST API, shared by every remote ``qwenvl`` command.

Where it connects: ``--base-url`` / ``QWENVL_BASE_URL``, else the API of the local stack recorded in
``$QWENVL_HOME/stack.json`` (``qwenvl up``), else ``http://127.0.0.1:8000``. Which key it presents:
``--api-key`` / ``QWENVL_API_KEY``, else the local stack's default-tenant key file ``$QWENVL_HOME/api_key``
(``--admin`` commands: ``QWENVL_ADMIN_KEY``, else ``$QWENVL_HOME/admin_key``).

Every API error (the OpenAI error envelope), an unreachable server or a missing key becomes an ``ApiError``
(a ``QwenVLError``), which ``qwenvl_cli.main`` prints as one line with exit status 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from qwenvl_core.errors import QwenVLError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
STATE_FILE = "stack.json"
API_KEY_FILE = "api_key"
ADMIN_KEY_FILE = "admin_key"

BaseUrlOption = Annotated[str | None, typer.Option(
    "--base-url", envvar="QWENVL_BASE_URL", help="API URL (default: the local stack's, http://127.0.0.1:8000).")]
ApiKeyOption = Annotated[str | None, typer.Option(
    "--api-key", envvar="QWENVL_API_KEY", show_default=False,
    help="API key (default: the local stack's key file $QWENVL_HOME/api_key).")]


class ApiError(QwenVLError):
    """The API refused a request, could not be reached, or no key is available."""


def check_finite(**flags: float | None) -> None:
    """Refuse a NaN or infinite number option (JSON has no such numbers), naming its flag: keyword names are the
    flags' without the dashes (``learning_rate_multiplier=...`` -> ``--learning-rate-multiplier``)."""
    for name, value in flags.items():
        if value is not None and not math.isfinite(value):
            raise ApiError(f"--{name.replace('_', '-')}: expected a finite number, got {value}")


def parse_json_option(flag: str, text: str) -> Any:
    """``text`` as strict JSON for the option ``flag``: ``NaN`` / ``Infinity`` and numbers beyond a float (``1e999``)
    are refused, as the API would refuse them."""
    def finite(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"{token} is not a finite number")
        return value

    def constant(token: str) -> Any:
        raise ValueError(f"{token} is not a JSON number")

    try:
        return json.loads(text, parse_float=finite, parse_constant=constant)
    except ValueError as exc:  # JSONDecodeError too
        raise ApiError(f"{flag}: not JSON ({exc})") from None


def qwenvl_home() -> Path:
    """The local stack's data directory: ``QWENVL_HOME``, default ``~/.qwenvl``."""
    return Path(os.environ.get("QWENVL_HOME") or Path.home() / ".qwenvl").expanduser().absolute()


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    """The local stack's record (``stack.json``), or None when there is none."""
    path = (home or qwenvl_home()) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ApiError(f"{path}: unreadable stack record ({exc}); run `qwenvl down` to clear it") from None


def resolve_base_url(base_url: str | None) -> str:
    if base_url:
        return base_url.rstrip("/")
    state = read_state()
    if state and state.get("api_url"):
        return str(state["api_url"]).rstrip("/")
    return DEFAULT_BASE_URL


def resolve_key(api_key: str | None, *, admin: bool = False) -> str:
    if api_key:
        return api_key
    env = os.environ.get("QWENVL_ADMIN_KEY" if admin else "QWENVL_API_KEY")
    if env:
        return env
    path = qwenvl_home() / (ADMIN_KEY_FILE if admin else API_KEY_FILE)
    try:
        return path.read_text().strip()
    except OSError:
        what = "an admin key (--admin-key / QWENVL_ADMIN_KEY)" if admin else "an API key (--api-key / QWENVL_API_KEY)"
        raise ApiError(f"no key: give {what}, or start the local stack with `qwenvl up` "
                       f"(it writes {path})") from None


def error_line(response: httpx.Response) -> str:
    """One readable line from an API error response (OpenAI envelope: error.message / code / param)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        code = error.get("code") or error.get("type")
        param = f" ({error['param']})" if error.get("param") else ""
        return f"{response.status_code} {code}: {error['message']}{param}"
    text = " ".join(response.text.split())[:200]
    return f"{response.status_code} {response.reason_phrase}: {text}"


class Client:
    """Authenticated JSON calls against one API; ``ApiError`` for every failure."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, admin: bool = False,
                 timeout: float = 60.0) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_key(api_key, admin=admin)
        if not (self.api_key.isascii() and self.api_key.isprintable()):  # it travels in an HTTP header
            where = "--admin-key / QWENVL_ADMIN_KEY" if admin else "--api-key / QWENVL_API_KEY"
            raise ApiError(f"the key holds a character that is not printable ASCII; check {where} or the key file")
        try:
            self._http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                      headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.InvalidURL as exc:
            raise ApiError(f"{self.base_url!r} is not a valid API URL ({exc}); check --base-url / "
                           "QWENVL_BASE_URL") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(f"{method} {self.base_url}{path}: timed out") from None
        except httpx.InvalidURL as exc:
            raise ApiError(f"{method} {self.base_url}{path}: not a valid URL ({exc})") from None
        except ValueError as exc:  # a body JSON cannot hold (NaN, infinity): every option is checked before this
            raise ApiError(f"{method} {self.base_url}{path}: the request cannot be sent ({exc})") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self.base_url} ({exc}); is the stack running? "
                           "(`qwenvl up`, or --base-url)") from None
        if response.status_code >= 400:
            raise ApiError(error_line(response))
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if body is not None:
            kwargs["json"] = body
        return self.request("POST", path, **kwargs).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def paginate(self, path: str, limit: int = 100, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of an OpenAI-style list (``data``, ``has_more``, ``after`` = last id)."""
        after: str | None = None
        while True:
            page = self.get(path, limit=limit, after=after, **params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def download(self, path: str, out: Path) -> int:
        """Stream a binary response into ``out``; the number of bytes written."""
        written = 0
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(error_line(response))
                tmp = out.with_name(out.name + ".part")
                with tmp.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                        written += len(chunk)
                tmp.replace(out)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ApiError(f"GET {self.base_url}{path}: {exc}") from None
        return written


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
