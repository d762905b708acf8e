"""Disconnects: 100 streaming requests dropped mid-stream at random points, ten at a time.

Each request is forced to LONG tokens, so every drop interrupts a generation: before the response
headers, right after them, or after a random amount of streamed text. After each wave the batch
slots and the queue must be free again (/metrics); every request that reached the engine must have
ended cancelled, none at its length (so none kept generating for a client that had gone); no
thread may outlive its request; and a greedy request after the storm must return exactly the
tokens it returned before. How long freeing the slots took is recorded, not asserted: it measures
the machine as much as the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import record
from tests.server.conftest import LONG, SPAIN, LiveServer, wait_until

WAVES = 10
PER_WAVE = 10  # more than the 8 batch slots: some drops hit queued requests
MAX_DROP_CHARS = 200  # a forced LONG-token answer is thousands of characters: dropped well before its end
CHAT = "/v1/chat/completions"


def greedy(server: LiveServer) -> list[tuple[str, int]]:
    """Greedy answers (chat and text) with their token counts: what must not change."""
    client = server.client()
    chat = client.chat.completions.create(model="tiny", messages=SPAIN, max_tokens=64, temperature=0)
    text = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=64, temperature=0)
    return [
        (chat.choices[0].message.content or "", chat.usage.completion_tokens),
        (text.choices[0].text, text.usage.completion_tokens),
    ]


async def engine_idle(http: httpx.AsyncClient) -> bool:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["slmflow_batch_size"] == 0 and values["slmflow_queue_depth"] == 0


async def drop(http: httpx.AsyncClient, rng: random.Random, kinds: Counter) -> None:
    body = {"model": "tiny", "messages": SPAIN, "stream": True, "max_tokens": LONG, "min_tokens": LONG}
    point = rng.choice(["before headers", "after headers", "after events", "after events"])
    kinds[point] += 1

    async def read() -> None:
        async with http.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            if point == "after headers":
                return
            # Counted in characters of text, not in events: how text is split into events depends on
            # the machine's speed.
            wanted, seen = rng.randint(1, MAX_DROP_CHARS), 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += len(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                if seen >= wanted:
                    return  # leaving the block closes the connection mid-stream
            raise AssertionError("the stream ended before it could be dropped")

    if point == "before headers":
        await send_and_hang_up(http, body, seconds=rng.uniform(0.001, 0.05))
    else:
        await read()


async def send_and_hang_up(http: httpx.AsyncClient, body: dict[str, Any], seconds: float) -> None:
    """Send the request on a socket of its own, wait, and close the socket before the answer.

    On a raw socket so that the drop is a real disconnect: cancelling an httpx request before its
    headers arrived sometimes left its connection open (found: 1 drop in 100, which the server then
    rightly served to the end, to a client that was still connected).
    """
    url = httpx.URL(str(http.base_url))
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(head.encode() + payload)
    await writer.drain()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(1), timeout=seconds)  # gone before the answer, or at its first byte
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def ends(server: LiveServer) -> dict[str, float]:
    return {
        r: server.metric("slmflow_finished_requests_total", reason=r) for r in ("stop", "length", "cancelled", "error")
    }


@pytest.mark.timeout(600)
def test_100_dropped_streams_are_cancelled_and_free_their_slots(server: LiveServer) -> None:
    seed = int(os.environ.get("SLMFLOW_RELIABILITY_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    before = greedy(server)
    threads = threading.active_count()
    tokens_before = server.metric("slmflow_generated_tokens_total")
    ends_before = ends(server)
    kinds: Counter[str] = Counter()
    free_seconds: list[float] = []

    async def storm() -> None:
        limits = httpx.Limits(max_connections=PER_WAVE * 2)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http:
            for _ in range(WAVES):
                await asyncio.gather(*(drop(http, rng, kinds) for _ in range(PER_WAVE)))
                dropped = time.monotonic()
                while not await engine_idle(http):
                    await asyncio.sleep(0.01)
                free_seconds.append(time.monotonic() - dropped)

    # Slots never freed would hang here: the bound is a deadlock detector, not a speed requirement.
    asyncio.run(asyncio.wait_for(storm(), timeout=480))
    generated = server.metric("slmflow_generated_tokens_total") - tokens_before
    ended = {reason: count - ends_before[reason] for reason, count in ends(server).items()}
    threads_gone = wait_until(lambda: threading.active_count() <= threads, timeout=30)
    after = greedy(server)
    figures: dict[str, Any] = {
        "dropped": sum(kinds.values()),
        "drop_points": dict(kinds),
        "seed": seed,
        "max_seconds_to_free_slots": round(max(free_seconds), 3),
        "median_seconds_to_free_slots": round(statistics.median(free_seconds), 3),
        "tokens_generated_by_dropped_requests": int(generated),
        "tokens_if_run_to_the_end": WAVES * PER_WAVE * LONG,
        "requests_cancelled_in_the_engine": int(ended["cancelled"]),
        "greedy_unchanged": after == before,
    }
    record("disconnects", **figures)
    assert figures["dropped"] == WAVES * PER_WAVE
    # Drops before the headers may leave before the request reaches the engine; every other one did.
    reached = WAVES * PER_WAVE - kinds["before headers"]
    assert reached <= ended["cancelled"] <= WAVES * PER_WAVE, (seed, ended)
    assert ended["stop"] == ended["length"] == ended["error"] == 0, f"a dropped request ran to its end (seed {seed})"
    assert threads_gone, f"{threading.active_count() - threads} threads outlived their requests (seed {seed})"
    assert after == before, (before, after)
