"""Prefix reuse in the engine: a conversation that continues reads only its new tokens, and answers
exactly as it would have without reuse. On the tiny fixture here; on SmolLM2 in tests/test_real_model.py.

Each test compares an engine that keeps prefixes with one that keeps none (prefix_cache_bytes=0), on
the same model, token for token; what was reused is read from the engine's counters and the usage.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from slmflow.generation.engine import EngineOptions, GenerationEngine
from slmflow.generation.params import SamplingParams
from tests.conftest import engine_held

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
SYSTEM = {"role": "system", "content": "You are a geography teacher. " * 6}
# Other conversations: they share no kept prefix (of 16 tokens or more) with SYSTEM's or each other's.
OTHER = {"role": "system", "content": "Answer in one line, please. " * 6}
THIRD = {"role": "system", "content": "Keep it short and exact. " * 6}
COUNTRIES = ("Spain", "France", "Japan", "Kenya", "Peru")


@pytest.fixture(scope="module")
def engines(onnx_int4: Path) -> Iterator[tuple[GenerationEngine, GenerationEngine]]:
    """(keeps prefixes, keeps none): prompts of 16 tokens and more are kept (the default is 256)."""
    reusing = GenerationEngine(onnx_int4, EngineOptions(prefix_min_tokens=16))
    fresh = GenerationEngine(onnx_int4, EngineOptions(prefix_cache_bytes=0))
    yield reusing, fresh
    reusing.close()
    fresh.close()


def converse(
    engine: GenerationEngine, countries: tuple[str, ...], params: SamplingParams = GREEDY, system: dict = SYSTEM
) -> list:
    """A conversation, one question per turn, each turn sent whole (as chat clients do)."""
    messages: list[dict[str, str]] = [system]
    completions = []
    for country in countries:
        messages.append({"role": "user", "content": f"What is the capital of {country}?"})
        completion = engine.generate(engine.render_chat(messages), params)
        messages.append({"role": "assistant", "content": completion.text})
        completions.append(completion)
    return completions


def test_a_continuing_conversation_reads_only_its_new_tokens_and_answers_the_same(engines) -> None:
    reusing, fresh = engines
    hits, cached = reusing.stats.prefix_hits, reusing.stats.prefix_cached_tokens
    with_reuse, without = converse(reusing, COUNTRIES), converse(fresh, COUNTRIES)
    assert [c.token_ids for c in with_reuse] == [c.token_ids for c in without]
    assert with_reuse[1].text == "The capital of France is Paris."
    # Turn 1 had nothing to reuse; every later turn found the prompt of the one before it (the
    # answer is read again: see prefix_cache.py).
    assert with_reuse[0].usage.cached_tokens == 0 and reusing.stats.prefix_hits - hits == len(COUNTRIES) - 1
    for before, turn in itertools.pairwise(with_reuse):
        assert turn.usage.cached_tokens == before.usage.prompt_tokens, (before.usage, turn.usage)
    assert reusing.stats.prefix_cached_tokens - cached == sum(c.usage.cached_tokens for c in with_reuse)
    assert all(c.usage.cached_tokens == 0 for c in without) and fresh.stats.prefix_hits == 0
    assert 0 < reusing.stats.prefix_cache_bytes <= reusing.options.prefix_cache_bytes


def test_the_same_prompt_again_reads_only_its_last_token(engines) -> None:
    reusing, fresh = engines
    prompt = reusing.render_chat([SYSTEM, {"role": "user", "content": "What is the capital of Cuba?"}])
    first, again = reusing.generate(prompt, GREEDY), reusing.generate(prompt, GREEDY)
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
    assert first.token_ids == again.token_ids == fresh.generate(prompt, GREEDY).token_ids


def test_seeded_and_min_tokens_requests_reuse_and_answer_the_same(engines) -> None:
    # Kept KV does not depend on how a request samples: the continuous scheduler samples each row
    # with its own random stream and holds each to its own min_tokens.
    reusing, fresh = engines
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=16)
    held = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)
    for params in (seeded, held):
        hits = reusing.stats.prefix_hits
        with_cache, without = converse(reusing, COUNTRIES[:3], params), converse(fresh, COUNTRIES[:3], params)
        assert reusing.stats.prefix_hits - hits >= 2, params  # turn 1 may find an earlier test's
        for before, turn in itertools.pairwise(with_cache):
            assert turn.usage.cached_tokens >= before.usage.prompt_tokens, params
        assert [c.token_ids for c in with_cache] == [c.token_ids for c in without], params  # seeds reproduce


def test_kept_prefixes_stay_within_the_budget_least_recently_used_out(onnx_int4: Path) -> None:
    probe = GenerationEngine(onnx_int4, EngineOptions(prefix_min_tokens=16))
    try:
        converse(probe, ("Spain",))
        probe.run_on_owner(lambda: None)  # the prompt is kept once its step ends, after the answer
        one = probe.stats.prefix_cache_bytes  # what one kept conversation takes
    finally:
        probe.close()
    assert one > 0
    engine = GenerationEngine(onnx_int4, EngineOptions(prefix_min_tokens=16, prefix_cache_bytes=one + one // 2))
    try:
        converse(engine, ("Spain",))
        converse(engine, ("Japan",), system=OTHER)  # the second conversation's prompt pushes the first out
        assert engine.stats.prefix_cache_bytes <= one + one // 2
        hits = engine.stats.prefix_hits
        converse(engine, ("Spain", "France"))  # Spain's turn 1 finds nothing kept for it any more...
        assert engine.stats.prefix_hits == hits + 1  # ...only its own turn 2 finds turn 1
        assert engine.stats.prefix_cache_bytes <= one + one // 2
    finally:
        engine.close()


def test_requests_in_one_batch_reuse_a_shared_prefix_and_are_kept(engines) -> None:
    reusing, fresh = engines
    converse(reusing, ("Spain",), system=THIRD)  # keeps THIRD's system prompt (with a question)
    prompts = [
        reusing.render_chat([THIRD, {"role": "user", "content": f"What is the capital of {c}?"}])
        for c in COUNTRIES[1:4]
    ]
    hits = reusing.stats.prefix_hits
    with engine_held(reusing):  # together: one batch of three, each reading only its question
        streams = reusing.submit_all([(p, GREEDY) for p in prompts])
    together = [stream.result() for stream in streams]
    assert reusing.stats.prefix_hits == hits + 3
    shared = len(reusing.encode(reusing.render_chat([THIRD, {"role": "user", "content": "What is the capital of"}])))
    assert all(shared - 4 <= c.usage.cached_tokens < c.usage.prompt_tokens for c in together), together
    assert [c.token_ids for c in together] == [fresh.generate(p, GREEDY).token_ids for p in prompts]
    again = reusing.generate(prompts[1], GREEDY)  # each of the three was kept: all but the last token
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1


def test_a_prompt_that_continues_an_answer_cut_at_its_length_answers_the_same(engines) -> None:
    # The Generator holds the cut answer, the last token of it without its KV (sampled, never read):
    # only its prompt is reused, and the answer read again.
    reusing, fresh = engines
    prompt = reusing.encode(reusing.render_chat([OTHER, {"role": "user", "content": "What is the capital of Peru?"}]))
    cut = reusing.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5))
    assert cut.finish_reason == "length"
    continued = [*prompt, *cut.token_ids, *reusing.encode(" Also, what is the capital of Chile?")]
    again = reusing.generate(continued, GREEDY)
    assert again.usage.cached_tokens == len(prompt)
    assert again.token_ids == fresh.generate(continued, GREEDY).token_ids
