"""`create_app(settings)`: the FastAPI app serving one MLflow model with OpenAI's API."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmflow.generation.openai import new_id
from slmflow.server import errors, routes
from slmflow.server.backend import Backend, load_backend, served_name
from slmflow.server.metrics import Metrics
from slmflow.server.monitoring import Monitor, Served, model_identity
from slmflow.server.settings import ServerSettings

log = logging.getLogger("slmflow.server")


def create_app(settings: ServerSettings | None = None, backend: Backend | None = None) -> FastAPI:
    """The app for `settings` (default: from `SLMFLOW_*`), serving `backend` or loading its model.

    A given backend stays the caller's to close; a model loaded here is loaded at startup and
    unloaded at shutdown. Also an app factory: `uvicorn --factory slmflow.server.app:create_app`.
    """
    settings = settings or ServerSettings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = backend if backend is not None else await run_in_threadpool(load_backend, settings)
        name = served_name(settings)
        identity = await run_in_threadpool(model_identity, settings, name)
        monitor = (
            Monitor(settings, identity, served.stats) if settings.traces or settings.metrics_interval > 0 else None
        )
        app.state.slmflow = routes.ServerState(
            settings=settings,
            backend=served,
            metrics=Metrics(served.stats, monitor.stats if monitor else None),
            model_name=name,
            created=int(time.time()),
            identity=identity,
            monitor=monitor,
        )
        try:
            yield
        finally:
            if monitor is not None:
                await run_in_threadpool(monitor.close)
            if backend is None:
                served.close()

    # With an API key only /health and /ping are open: the schema needs the key, and the docs pages
    # (which cannot send it) are off.
    locked = settings.api_key is not None
    app = FastAPI(
        title="slmflow",
        lifespan=lifespan,
        openapi_url=None if locked else "/openapi.json",
        docs_url=None if locked else "/docs",
        redoc_url=None if locked else "/redoc",
    )
    errors.install(app)
    app.include_router(routes.open_routes)
    app.include_router(routes.api)
    if locked:
        app.include_router(routes.keyed_schema)
    if settings.playground:
        # A static page, open like the docs would be: everything it shows comes through the API,
        # which needs the key (the page asks for it).
        app.include_router(routes.playground)
        app.mount("/playground", StaticFiles(directory=routes.PLAYGROUND), name="playground")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog)  # outermost: it sees every answer, 413s included
    return app


class BodyLimit:
    """Refuse bodies over `max_bytes` with a 413, whether declared up front or streamed in chunks.

    Not Starlette's own limit: that one answers a declared oversize in plain text, not the envelope.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await errors.error_response(HTTPException(413))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised inside the route's body read; FastAPI passes HTTPExceptions on to the handlers.
                raise HTTPException(413)
            return message

        await self.app(scope, counting_receive, send)


class RequestLog:
    """One log line and one `slmflow_requests` count per HTTP request, whatever answered it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        started, started_ns = time.perf_counter(), time.time_ns()
        status = 500  # if nothing is sent, the client saw the connection fail

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            _log_request(scope, request_id, status, seconds)
            _monitor(scope, request_id, status, started_ns, seconds)


def _monitor(scope: Scope, request_id: str, status: int, started_ns: int, seconds: float) -> None:
    """Hand the finished request to the monitor (a queue put: its export happens elsewhere)."""
    monitor = scope["app"].state.slmflow.monitor
    route = scope.get("route")
    if monitor is None or route is None:
        return
    state = scope.get("state", {})
    usage = state.get("usage")
    monitor.offer(
        Served(
            route=route.path,
            status=status,
            started_ns=started_ns,
            seconds=seconds,
            request_id=request_id,
            outcome=state.get("outcome"),
            inputs=state.get("trace_inputs"),
            choices=state.get("choices") or [],
            usage=usage.as_dict() if usage else None,
            first_token_seconds=state.get("first_token_seconds"),
        )
    )


def _log_request(scope: Scope, request_id: str, status: int, seconds: float) -> None:
    route = scope.get("route")
    scope["app"].state.slmflow.metrics.requests.labels(route.path if route else "unmatched", str(status)).inc()
    state = scope.get("state", {})
    usage, ttft, outcome = state.get("usage"), state.get("first_token_seconds"), state.get("outcome")
    log.info(
        "%s %s %s %d%s%s%s %.3fs",
        request_id,
        scope["method"],
        scope["path"],
        status,
        f" tokens={usage.prompt_tokens}+{usage.completion_tokens}" if usage else "",
        f" ttft={ttft:.3f}s" if ttft is not None else "",
        f" ({outcome})" if outcome else "",
        seconds,
    )


def _configure_logging(level: str) -> None:
    """Per-request lines need a handler even under a bare `uvicorn`, which configures only its own."""
    logger = logging.getLogger("slmflow")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
