"""From blocking generations to the event loop, and out to the client as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

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
    """Carries the deltas of one request's generations to the event loop, one thread per generation.

    Generation iterators block, so each runs on its own thread and hands its text to the loop; the
    loop never waits on the engine. The threads start at once, and leaving the `with` block cancels
    every generation not yet finished: a request that fails, times out or loses its client frees
    its batch slots.
    """

    def __init__(self, generations: Sequence[Generation], *, started: float, timeout: float) -> None:
        self.generations = generations
        self.started = started  # event-loop time the request arrived
        self.timeout = timeout
        self.first_token_seconds: float | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        for index, generation in enumerate(generations):
            threading.Thread(
                target=self._pump, args=(index, generation), name=f"slmflow-relay-{index}", daemon=True
            ).start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel every generation not finished yet (cancelling a finished one does nothing)."""
        for generation in self.generations:
            generation.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        """Deltas as they arrive, until every choice is finished; raises the first failure."""
        open_choices = len(self.generations)
        while open_choices:
            try:
                async with asyncio.timeout_at(self.started + self.timeout):
                    item = await self._queue.get()
            except TimeoutError:
                raise request_timeout(self.timeout) from None
            if isinstance(item, Exception):
                raise item
            if self.first_token_seconds is None:
                self.first_token_seconds = self._loop.time() - self.started
            if item.completion is not None:
                open_choices -= 1
            yield item

    async def completions(self) -> list[Completion]:
        """Wait for every choice; the finished completions in choice order."""
        finished: dict[int, Completion] = {}
        async for delta in self:
            if delta.completion is not None:
                finished[delta.index] = delta.completion
        return [finished[index] for index in range(len(self.generations))]

    def _pump(self, index: int, generation: Generation) -> None:
        try:
            for text in generation:
                self._put(Delta(index, text))
            if generation.completion is not None:  # None: cancelled, so nobody is waiting
                self._put(Delta(index, completion=generation.completion))
        except Exception as error:  # re-raised on the loop, in the request that owns it
            self._put(error)

    def _put(self, item: Delta | Exception) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


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
