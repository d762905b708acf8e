"""Disconnects: 100 streaming requests dropped mid-stream at random points, ten at a time.

Each request is forced to LONG tokens (about a second of decoding), so every drop interrupts a
generation: before the response headers, right after them, or after a random number of events.
After each wave the batch slots and the queue must be free again (/metrics) within one second, no
thread may outlive its request, the dropped requests must have stopped generating, and a greedy request
after the storm must return exactly the tokens it returned before.
"""

from __future__ import annotations

import asyncio
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
FREE_WITHIN = 1.0  # seconds
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
            wanted, seen = rng.randint(1, 80), 0
            async for line in response.aiter_lines():
                seen += bool(line)
                if seen >= wanted:
                    return  # leaving the block closes the connection mid-stream
            raise AssertionError("the stream ended before it could be dropped")

    if point == "before headers":
        try:
            await asyncio.wait_for(read(), timeout=rng.uniform(0.001, 0.05))
        except TimeoutError:
            pass
    else:
        await read()



@pytest.mark.timeout(240)
def test_100_dropped_streams_free_their_slots_within_a_second(server: LiveServer) -> None:
    seed = int(os.environ.get("SLMFLOW_RELIABILITY_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    before = greedy(server)
    threads = threading.active_count()
    tokens_before = server.metric("slmflow_generated_tokens_total")
    kinds: Counter[str] = Counter()
    free_seconds: list[float] = []

    async def storm() -> None:
        limits = httpx.Limits(max_connections=PER_WAVE * 2)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http:
            for _ in range(WAVES):
                await asyncio.gather(*(drop(http, rng, kinds) for _ in range(PER_WAVE)))
                dropped = time.monotonic()
                for _ in range(500):  # polls every 10 ms, 5 s at most
                    if await engine_idle(http):
                        break
                    await asyncio.sleep(0.01)
                free_seconds.append(time.monotonic() - dropped)

    asyncio.run(asyncio.wait_for(storm(), timeout=180))
    generated = server.metric("slmflow_generated_tokens_total") - tokens_before
    threads_gone = wait_until(lambda: threading.active_count() <= threads, timeout=5)
    after = greedy(server)
    figures: dict[str, Any] = {
        "dropped": sum(kinds.values()),
        "drop_points": dict(kinds),
        "seed": seed,
        "max_seconds_to_free_slots": round(max(free_seconds), 3),
        "median_seconds_to_free_slots": round(statistics.median(free_seconds), 3),
        "tokens_generated_by_dropped_requests": int(generated),
        "tokens_if_run_to_the_end": WAVES * PER_WAVE * LONG,
        "greedy_unchanged": after == before,
    }
    record("disconnects", **figures)
    assert figures["dropped"] == WAVES * PER_WAVE
    assert max(free_seconds) < FREE_WITHIN, (seed, free_seconds)
    assert threads_gone, f"{threading.active_count() - threads} threads outlived their requests (seed {seed})"
    assert generated < 0.5 * WAVES * PER_WAVE * LONG, f"dropped requests kept generating (seed {seed})"
    assert after == before, (before, after)
