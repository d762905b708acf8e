"""`slmflow serve` (the OpenAI-compatible server) and `slmflow chat` (a terminal chat)."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterator
from typing import Any

import click

from slmflow.server.settings import ServerSettings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per ServerSettings field (--max-queue for max_queue), so flags, env vars and the
    settings class can never disagree. Unset flags stay None and leave the env or default alone."""
    for name, field in reversed(list(ServerSettings.model_fields.items())):
        if name == "model_uri":
            continue
        default = "" if field.default is None else f"; default {field.default}"
        help_text = f"{field.description} [env SLMFLOW_{name.upper()}{default}]"
        option = click.option(f"--{name.replace('_', '-')}", name, type=_click_type(field.annotation), help=help_text)
        command = option(command)
    return command


def _click_type(annotation: Any) -> Any:
    """int | None -> int; Literal["a", "b"] -> a choice; anything else (str, SecretStr) -> str."""
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice(typing.get_args(annotation))
    kind = next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)
    return kind if kind in (int, float, bool) else str


def _settings(**values: Any) -> ServerSettings:
    """ServerSettings from the given flags over the environment; a bad value is a usage error."""
    from pydantic import ValidationError

    try:
        return ServerSettings(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "settings"
        raise click.BadParameter(first["msg"], param_hint=f"--{name.replace('_', '-')} / SLMFLOW_{name.upper()}") from e


CHAT_MAX_TOKENS = 512  # `slmflow chat`'s bound on an answer when neither the user nor the model sets one


@click.command()
@click.argument("model_uri")
@_settings_options
def serve(model_uri: str, **flags: Any) -> None:
    """Serve MODEL_URI with an OpenAI-compatible HTTP API (plus /metrics and /invocations)."""
    import uvicorn

    from slmflow.server import create_app
    from slmflow.server.backend import load_backend

    settings = _settings(model_uri=model_uri, **flags)
    # Request traces are exported by the server's monitor thread, off the request path already:
    # MLflow's own export threads would only add writers (ten of them exhaust a SQLite store's pool).
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    if settings.host not in LOOPBACK and settings.api_key is None:
        click.echo(
            f"warning: serving on {settings.host} without --api-key: anyone who reaches it can use the model", err=True
        )
    click.echo(f"loading {model_uri}", err=True)
    backend = load_backend(settings)
    try:
        app = create_app(settings, backend)
        # Our per-request log line replaces uvicorn's access log; keep_alive: see ServerSettings.
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_keep_alive=settings.keep_alive,
        )
    finally:
        backend.close()


@click.command()
@click.argument("model_uri")
@click.option("--message", "-m", help="Ask this one question, print the answer and exit.")
@click.option("--system", help="System prompt for the conversation.")
@click.option(
    "--max-tokens",
    type=int,
    help=f"Longest answer, in tokens (default: the packaged model's, else {CHAT_MAX_TOKENS}).",
)
@click.option("--temperature", type=float, help="0 for greedy answers (default: the model's).")
def chat(
    model_uri: str, message: str | None, system: str | None, max_tokens: int | None, temperature: float | None
) -> None:
    """Chat with MODEL_URI in the terminal, streaming tokens (--message for one shot)."""
    from slmflow.errors import SlmflowError
    from slmflow.generation.params import SamplingParams
    from slmflow.server.backend import load_backend

    backend = load_backend(_settings(model_uri=model_uri, max_batch_size=1))
    # A person is waiting: an answer is bounded even when neither they nor the model say how long it may be
    # (a small model can otherwise run on to its whole context: 8,000 tokens for SmolLM2).
    packaged = getattr(backend, "defaults", SamplingParams()).max_tokens
    max_tokens = max_tokens or packaged or CHAT_MAX_TOKENS
    params = SamplingParams.from_mapping({"max_tokens": max_tokens, "temperature": temperature})
    history = [{"role": "system", "content": system}] if system else []
    try:
        if message is not None:
            _answer(backend, history, message, params)
            return
        while (text := _read_turn()) is not None:
            try:
                _answer(backend, history, text, params)
            except SlmflowError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
                history.pop()
                click.echo(f"error: {e}", err=True)
    finally:
        backend.close()


def _answer(backend: Any, history: list[dict[str, str]], text: str, params: Any) -> None:
    """Stream the model's answer to `text`; Ctrl-C stops the answer, not the chat."""
    history.append({"role": "user", "content": text})
    generation = backend.chat(history, params, 1)[0]
    pieces: list[str] = []
    try:
        for piece in _pieces(generation):
            click.echo(piece, nl=False)
            pieces.append(piece)
    except KeyboardInterrupt:
        generation.cancel()
        click.echo(" [stopped]", nl=False)
    click.echo()
    history.append({"role": "assistant", "content": "".join(pieces)})


def _pieces(generation: Any) -> Iterator[str]:
    """The text of a backend's Generation as it arrives (streamed by the engine, whole by a pyfunc)."""
    import threading

    woken = threading.Event()
    generation.listen(woken.set)
    while True:
        woken.wait(0.5)
        woken.clear()
        if text := generation.poll():
            yield text
        if generation.completion is not None:
            return


def _read_turn() -> str | None:
    """The user's next message; None at end of input or Ctrl-C."""
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return None
        if text:
            return text
