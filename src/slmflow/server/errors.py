"""The one place that turns failures into OpenAI's error envelope.

Every error the server sends, whatever raised it (our own errors, FastAPI's validation, Starlette's
404/405/413, MLflow's scoring errors), is `{"error": {"message", "type", "param", "code"}}`. Bad input
is always a 4xx: only a bug in the server is a 500.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from slmflow.errors import InvalidRequest, Overloaded, SlmflowError

# Seconds a client should wait before retrying a request refused because the queue is full.
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """A failure already in OpenAI's terms, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def request_timeout(seconds: float) -> ApiError:
    return ApiError(
        504, f"the request did not finish within {seconds:g} s", type="timeout_error", code="request_timeout"
    )


def client_gone() -> ApiError:
    # nginx's "client closed request": only the log ever sees it.
    return ApiError(499, "the client closed the connection", code="client_closed_request")


def as_api_error(error: BaseException, request: Request | None = None) -> ApiError:
    """The API error that `error` stands for; anything unexpected is a 500 without internals."""
    from mlflow.exceptions import MlflowException  # loaded with the model already: no cost here

    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequest):
        return ApiError(400, str(error), param=error.param, code=error.code)
    if isinstance(error, Overloaded):
        return ApiError(
            429,
            f"{error}; retry later",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, SlmflowError):
        return ApiError(500, str(error), type="server_error")
    if isinstance(error, RequestValidationError):
        return _validation_error(error.errors())
    if isinstance(error, HTTPException):
        return _http_error(error, request)
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        kind = "invalid_request_error" if status < 500 else "server_error"
        return ApiError(status, error.message, type=kind, code=str(error.error_code))
    return ApiError(500, "internal server error", type="server_error")


def error_response(error: BaseException, request: Request | None = None) -> JSONResponse:
    api_error = as_api_error(error, request)
    if request is not None:  # the request's log line and trace say what went wrong
        request.state.outcome = api_error.code or api_error.type
    return JSONResponse(api_error.body(), status_code=api_error.status, headers=api_error.headers)


def install(app: FastAPI) -> None:
    """Route every failure through the envelope."""
    from mlflow.exceptions import MlflowException

    async def handle(request: Request, error: Exception) -> JSONResponse:
        return error_response(error, request)

    for kind in (ApiError, SlmflowError, RequestValidationError, HTTPException, MlflowException):
        app.add_exception_handler(kind, handle)
    # A bug: Starlette sends this 500 envelope, then re-raises so the traceback reaches the log.
    app.add_exception_handler(Exception, handle)


def _validation_error(errors: Sequence[Any]) -> ApiError:
    """FastAPI's body validation errors, as OpenAI reports bad input: 400, naming the field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    messages = [f"{_param_path(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors]
    return ApiError(400, "; ".join(messages), param=_param_path(first.get("loc", ())) or None, code="invalid_value")


def _param_path(loc: Sequence[Any]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role", the way OpenAI names parameters."""
    path = ""
    for part in loc[1:] if tuple(loc[:1]) == ("body",) else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _http_error(error: HTTPException, request: Request | None) -> ApiError:
    where = f"{request.method} {request.url.path}" if request else "this URL"
    if error.status_code == 404:
        return ApiError(404, f"Invalid URL ({where})", code="not_found")
    if error.status_code == 405:
        return ApiError(405, f"Method not allowed ({where})", code="method_not_allowed", headers=error.headers)
    if error.status_code == 413:
        return ApiError(413, "the request body is too large", code="request_too_large")
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return ApiError(error.status_code, str(error.detail), type=kind, headers=error.headers)
