"""The one table from domain errors to HTTP, and the handlers that answer in OpenAI's error envelope.

Every error leaves the API as ``{"error": {"message", "type", "param", "code"}}``. Domain code raises an
``ApiError`` subclass; request validation errors (bad JSON, wrong types, missing fields) become 400 with the
field named; unknown routes 404; anything unexpected 500 with a generic message (details only in the log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure the client should see. Subclasses fix status and type; ``code`` and ``param`` refine it."""

    status = 400
    type = "invalid_request_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code or self.default_code
        self.retry_after_s = retry_after_s  # sent as ``Retry-After`` (429 / 503)


class InvalidRequest(ApiError):
    pass


class Unauthorized(ApiError):
    status, type, default_code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(ApiError):
    status, type, default_code = 403, "permission_error", "permission_denied"


class NotFound(ApiError):
    status, type, default_code = 404, "invalid_request_error", "not_found"


class Conflict(ApiError):
    status, type, default_code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ApiError):
    status, type, default_code = 413, "invalid_request_error", "payload_too_large"


class QuotaExceeded(ApiError):
    status, type, default_code = 429, "rate_limit_error", "quota_exceeded"


class Unavailable(ApiError):
    status, type, default_code = 503, "server_error", "unavailable"


class TimedOut(ApiError):
    status, type, default_code = 504, "server_error", "timeout"




def envelope(status: int, message: str, type_: str, param: str | None = None, code: str | None = None
             ) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    response = envelope(exc.status, exc.message, exc.type, exc.param, exc.code)
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    param = _field_path(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
    more = len(exc.errors()) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return envelope(400, message, "invalid_request_error", param, "invalid_value")


_BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's 400 for any parse failure but JSON syntax


def _body_problem(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it says only that it could not)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not valid UTF-8 (byte {cause.start + 1})"
    if isinstance(cause, RecursionError):
        return "its JSON is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number in its JSON is too long"
    return f"{type(cause).__name__}: {str(cause)[:200]}" if cause is not None else "unknown reason"


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:
        return envelope(400, f"the request body could not be parsed: {_body_problem(exc.__cause__)}", type_, "body",
                        "invalid_body")
    return envelope(exc.status_code, str(exc.detail), type_, None, None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return envelope(500, "internal server error", "server_error", None, None)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
