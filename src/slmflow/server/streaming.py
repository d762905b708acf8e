"""From blocking generations to the event loop, and out to the client as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from slmflow.generation.openai import Completion
from slmflow.server.backend import Generation
from slmflow.server.errors import request_timeout

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`; its last delta carries the finished `completion` instead."""

    index: int
    text: str = ""
    completion: Completion | None = None


class Relay:
    """Carries the deltas of one request's generations to the event loop.

    Generations announce news through a callback on whatever thread produces them (the engine's);
    the callback only schedules one wake-up of the loop, which then polls every generation without
    waiting. Tokens that pile up while the loop is busy therefore travel as one delta, and no thread
    per request competes with the engine for the interpreter. Leaving the `with` block cancels every
    generation not yet finished: a request that fails, times out or loses its client frees its
    batch slots.
    """

    def __init__(self, generations: Sequence[Generation], *, started: float, timeout: float) -> None:
        self.generations = generations
        self.started = started  # event-loop time the request arrived
        self.timeout = timeout
        self.first_token_seconds: float | None = None
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._wake_scheduled = False
        for generation in generations:
            generation.listen(self._wake)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel every generation not finished yet (cancelling a finished one does nothing)."""
        for generation in self.generations:
            generation.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        """Deltas as they arrive, until every choice is finished; raises the first failure."""
        open_choices = set(range(len(self.generations)))
        while open_choices:
            try:
                async with asyncio.timeout_at(self.started + self.timeout):
                    await self._ready.wait()
            except TimeoutError:
                raise request_timeout(self.timeout) from None
            # Re-arm before polling: news that arrives from here on schedules another wake-up.
            self._ready.clear()
            self._wake_scheduled = False
            for index in sorted(open_choices):
                generation = self.generations[index]
                text = generation.poll()
                if (text or generation.completion) and self.first_token_seconds is None:
                    self.first_token_seconds = self._loop.time() - self.started
                if text:
                    yield Delta(index, text)
                if generation.completion is not None:
                    open_choices.discard(index)
                    yield Delta(index, completion=generation.completion)

    async def completions(self) -> list[Completion]:
        """Wait for every choice; the finished completions in choice order."""
        finished: dict[int, Completion] = {}
        async for delta in self:
            if delta.completion is not None:
                finished[delta.index] = delta.completion
        return [finished[index] for index in range(len(self.generations))]

    def _wake(self) -> None:
        """Called on the producing thread: at most one wake-up of the loop is pending at a time."""
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            self._loop.call_soon_threadsafe(self._ready.set)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """The SSE response of one request; however it ends, its generations are cancelled.

    Starlette cancels a response whose client disconnects. If that happens during a send, the event
    generator is left suspended at a `yield`; if it happens before the first event, the generator
    never ran at all. So the cleanup is here, not in the generator: close it, then the relay.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], relay: Relay) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            self._relay.close()
