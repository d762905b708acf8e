"""The HTTP routes: OpenAI's chat and text completions, models, health, metrics and MLflow scoring."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from slmflow.generation.openai import (
    Completion,
    chat_chunk,
    chat_completion,
    new_id,
    text_chunk,
    text_completion,
    tool_call_deltas,
    total_usage,
)
from slmflow.generation.params import SamplingParams
from slmflow.generation.tools import Tools, answered_with_calls, may_be_a_call
from slmflow.server.backend import Backend, Generation
from slmflow.server.errors import ApiError, as_api_error, client_gone, unauthorized
from slmflow.server.metrics import Metrics
from slmflow.server.monitoring import ModelIdentity, Monitor
from slmflow.server.schemas import (
    ERROR_RESPONSES,
    INVOCATIONS_BODY,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    sampling_params,
)
from slmflow.server.settings import ServerSettings
from slmflow.server.streaming import DONE, EventStream, Relay, sse

log = logging.getLogger("slmflow.server")
T = TypeVar("T")


@dataclass
class ServerState:
    """What the routes share: one per app, in `app.state.slmflow`."""

    settings: ServerSettings
    backend: Backend
    metrics: Metrics
    model_name: str
    created: int  # when the model was loaded: /v1/models reports it
    identity: ModelIdentity | None = None  # the served model's URI, LoggedModel and registered version
    monitor: Monitor | None = None  # traces and serving metrics into MLflow


def server(request: Request) -> ServerState:
    return request.app.state.slmflow


async def require_api_key(request: Request) -> None:
    """Bearer auth when an API key is set; the comparison takes the same time whatever the key.

    Async on purpose: FastAPI runs a plain-def dependency on a worker thread, and that hop (which
    waits for the engine to let go of the GIL) spread requests sent together over milliseconds, so
    they missed each other's batch.
    """
    key = server(request).settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise unauthorized()


open_routes = APIRouter(responses=ERROR_RESPONSES)
api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
# With an API key, the OpenAPI schema needs it too (create_app turns FastAPI's open one off).
keyed_schema = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)


@keyed_schema.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


# A completion is JSON, or Server-Sent Events with `stream`.
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}


@open_routes.get("/health")
@open_routes.get("/ping")  # `mlflow models serve`'s health check
async def health(request: Request) -> dict[str, str]:
    return {"status": "ok", "model": server(request).model_name}


@api.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = server(request)
    model: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "slmflow"}
    if state.identity is not None:  # beyond OpenAI's fields: where the model came from
        model["model_uri"] = state.identity.uri
        if state.identity.registered:
            model["registered_model"], model["version"] = state.identity.registered
    return {"object": "list", "data": [model]}


PLAYGROUND = Path(__file__).parent / "playground"
playground = APIRouter(include_in_schema=False)


@playground.get("/")
async def playground_page() -> FileResponse:
    """The chat playground (its script and style are under /playground)."""
    return FileResponse(PLAYGROUND / "index.html", media_type="text/html")


@api.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    tools = Tools.parse(body.tools, body.tool_choice, body.parallel_tool_calls)
    return await _complete(
        request, body, CHAT, lambda backend, params: backend.chat(body.messages, params, body.choices, tools), tools
    )


@api.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(
        request, body, TEXT, lambda backend, params: backend.complete(body.prompt, params, body.choices)
    )


@api.post(
    "/invocations",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": INVOCATIONS_BODY}}}},
)
async def invocations(request: Request) -> Response:
    """MLflow's scoring protocol, answered by MLflow's own code so its clients see no difference."""
    body = await request.body()
    content_type = request.headers.get("content-type", "application/json")
    answer = await run_in_threadpool(server(request).backend.invoke, body, content_type)
    if answer.status >= 400:  # MLflow answers an unsupported content type in plain text
        raise ApiError(answer.status, str(answer.response))
    return Response(answer.response, status_code=answer.status, media_type=answer.mimetype)


# --- completions, chat and text alike ---------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """What differs between chat and text completions: ids, the whole object, the chunks."""

    id_prefix: str
    whole: Callable[..., dict[str, Any]]
    chunk: Callable[..., dict[str, Any]]
    announces_role: bool  # chat streams open each choice with {"role": "assistant"}


CHAT = _Kind("chatcmpl", chat_completion, chat_chunk, announces_role=True)
TEXT = _Kind("cmpl", text_completion, text_chunk, announces_role=False)


async def _complete(
    request: Request,
    body: OpenAIRequest,
    kind: _Kind,
    start: Callable[[Backend, SamplingParams], list[Generation]],
    tools: Tools | None = None,
) -> Response:
    state = server(request)
    started = asyncio.get_running_loop().time()
    request.state.trace_inputs = _trace_inputs(body)  # for the monitor, once the request has ended
    params = sampling_params(body.model_dump())
    # Rendering, tokenizing and queueing run on the loop: ONNX Runtime GenAI's Python binding holds
    # the GIL while it tokenizes (and while it decodes), so a worker thread would block the loop
    # just the same and only add two thread switches, each of which can wait for a decode step.
    generations = start(state.backend, params)
    relay = Relay(generations, started=started, timeout=state.settings.request_timeout)
    if body.stream:
        return EventStream(_events(request, relay, kind, include_usage=body.include_usage, tools=tools), relay)
    with relay:
        finished = [answered_with_calls(c, tools) for c in await _unless_client_leaves(request, relay.completions())]
    _answered(request, finished, relay.first_token_seconds)
    request.state.choices = [_traced_choice(c) for c in finished]
    return JSONResponse(kind.whole(finished, model=state.model_name))


async def _events(
    request: Request, relay: Relay, kind: _Kind, *, include_usage: bool, tools: Tools | None = None
) -> AsyncGenerator[str, None]:
    """The SSE stream of one request (EventStream cancels its generations, however it ends).

    The status line is sent before the first event, so a failure travels as an error event. With
    tools, text that may be a function call is held back until it is clearly not one (then sent as
    content) or the answer ends (then sent as tool-call deltas).
    """
    common = {"id": new_id(kind.id_prefix), "model": server(request).model_name, "created": int(time.time())}
    finished: dict[int, Completion] = {}
    # What each choice said so far, for the request's trace however the stream ends.
    choices: list[dict[str, Any]] = [{"text": "", "finish_reason": None} for _ in relay.generations]
    request.state.choices = choices
    held = [tools is not None and tools.active for _ in relay.generations]  # text held back as a possible call
    sent = [0] * len(relay.generations)  # characters of each choice's text sent as content
    try:
        if kind.announces_role:
            for index in range(len(relay.generations)):
                yield sse(kind.chunk(**common, index=index, role="assistant", content=""))
        async for delta in relay:
            index, choice = delta.index, choices[delta.index]
            if delta.completion is None:
                choice["text"] += delta.text
                if held[index] and not (tools and (tools.constrained or may_be_a_call(choice["text"]))):
                    held[index] = False  # not a call after all: what was held goes out as content
                if not held[index]:
                    yield sse(kind.chunk(**common, index=index, content=choice["text"][sent[index] :]))
                    sent[index] = len(choice["text"])
                continue
            completion = answered_with_calls(delta.completion, tools) if held[index] else delta.completion
            finished[index] = completion
            choice |= _traced_choice(completion)
            if completion.tool_calls:
                for calls in tool_call_deltas(completion.tool_calls):
                    yield sse(kind.chunk(**common, index=index, tool_calls=calls))
            elif held[index] and completion.text:
                yield sse(kind.chunk(**common, index=index, content=completion.text))
            yield sse(kind.chunk(**common, index=index, finish_reason=completion.finish_reason))
    except Exception as error:
        api_error = as_api_error(error, request)
        if api_error.status >= 500:
            log.error("stream failed", exc_info=error)
        request.state.outcome = api_error.code or api_error.type
        yield sse(api_error.body())
        return
    finally:
        if len(finished) < len(relay.generations) and not hasattr(request.state, "outcome"):
            request.state.outcome = "client disconnected"
    completions = [finished[index] for index in range(len(finished))]
    _answered(request, completions, relay.first_token_seconds)
    if include_usage:
        yield sse(kind.chunk(**common, usage=total_usage(completions), with_choice=False))
    yield DONE


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (the caller's relay frees the slots)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # the client left first
        raise client_gone()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect, whenever it comes.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _traced_choice(completion: Completion) -> dict[str, Any]:
    """A finished choice as its trace keeps it."""
    choice: dict[str, Any] = {"text": completion.text, "finish_reason": completion.finish_reason}
    if completion.tool_calls:
        choice["tool_calls"] = [call.as_openai() for call in completion.tool_calls]
    return choice


def _trace_inputs(body: OpenAIRequest) -> dict[str, Any]:
    """The request as its trace keeps it: messages or prompt, and every parameter it set."""
    return body.model_dump(exclude_none=True, exclude={"model"})


def _answered(request: Request, completions: list[Completion], first_token_seconds: float | None) -> None:
    """Count a finished request in the metrics and its log line."""
    usage = total_usage(completions)
    server(request).metrics.answered(usage, first_token_seconds)
    request.state.usage = usage
    request.state.first_token_seconds = first_token_seconds
