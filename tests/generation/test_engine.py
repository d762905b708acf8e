"""The generation engine on the tiny trained fixture (int4), in-process: no MLflow, no HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from slmflow.errors import InvalidRequest
from slmflow.generation.params import SamplingParams
from tests.conftest import assert_as_alone, engine_held, finished, prompt_reads

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
SPAIN = [{"role": "user", "content": "What is the capital of Spain?"}]
QUESTIONS = [
    [{"role": "user", "content": f"What is the capital of {country}?"}]
    for country in ("Spain", "France", "Japan", "Kenya", "Peru", "Norway", "Cuba", "Italy")
]


@pytest.fixture(scope="module", params=["continuous", "genai"])
def engine(onnx_int4, request):  # -> GenerationEngine; every test here runs on both schedulers
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    engine = GenerationEngine(onnx_int4, EngineOptions(scheduler=request.param))
    assert engine.scheduler == request.param
    yield engine
    engine.close()


def test_greedy_chat_answers_the_trained_question(engine) -> None:
    completion = engine.generate(engine.render_chat(SPAIN), GREEDY)
    assert completion.text == "The capital of Spain is Madrid."
    assert completion.finish_reason == "stop"


def test_usage_counts_prompt_and_generated_tokens_exactly(engine) -> None:
    prompt = engine.render_chat(SPAIN)
    stream = engine.submit(prompt, GREEDY)
    pieces = list(stream)
    completion = stream.completion
    assert completion.usage.prompt_tokens == len(engine.encode(prompt))
    # every answer token plus the end-of-turn token that stopped it
    assert completion.usage.completion_tokens == len(engine.encode(completion.text)) + 1
    assert "".join(pieces) == completion.text


def test_max_tokens_truncates_with_finish_reason_length(engine) -> None:
    completion = engine.generate(engine.render_chat(SPAIN), SamplingParams(temperature=0, max_tokens=3))
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    assert "The capital of Spain is Madrid.".startswith(completion.text) and completion.text


def test_stop_string_ends_generation_and_is_not_returned(engine) -> None:
    completion = engine.generate(engine.render_chat(SPAIN), SamplingParams(temperature=0, stop=("Madrid",)))
    assert completion.text == "The capital of Spain is "
    assert completion.finish_reason == "stop"


def test_min_tokens_forces_output_length(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)
    completion = engine.generate(engine.render_chat(SPAIN), params)
    assert completion.usage.completion_tokens == 20 and completion.finish_reason == "length"


def test_same_seed_same_sample_and_other_seed_differs(engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Tell me a joke"}])
    sample = SamplingParams(temperature=2.0, top_k=0, max_tokens=24)
    first = engine.generate(prompt, SamplingParams(seed=7).merged_over(sample)).text
    again = engine.generate(prompt, SamplingParams(seed=7).merged_over(sample)).text
    others = {engine.generate(prompt, SamplingParams(seed=s).merged_over(sample)).text for s in (8, 9, 10)}
    assert first == again
    assert others - {first}, "three other seeds all reproduced seed 7's sample"


def test_concurrent_requests_equal_sequential_results(engine) -> None:
    prompts = [engine.render_chat(q) for q in QUESTIONS]
    sequential = [engine.generate(p, GREEDY) for p in prompts]
    batches_before = engine.stats.batches
    # Submitted from eight threads while the engine is busy: they wait together, so they are batched.
    with engine_held(engine), ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(lambda p: engine.submit(p, GREEDY), prompts))
    concurrent = [s.result() for s in streams]
    assert [c.text for c in concurrent] == [s.text for s in sequential]
    assert [c.usage for c in concurrent] == [s.usage for s in sequential]
    assert engine.stats.batches - batches_before == 1, "eight waiting requests did not share one batch"


def test_prompt_over_the_context_is_rejected_before_queueing(engine) -> None:
    long_prompt = "capital " * engine.context_length
    with pytest.raises(InvalidRequest) as error:
        engine.submit(long_prompt, GREEDY)
    assert error.value.code == "context_length_exceeded"


def test_max_tokens_beyond_the_context_is_rejected(engine) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.submit(engine.render_chat(SPAIN), SamplingParams(max_tokens=engine.context_length))
    assert error.value.code == "context_length_exceeded" and error.value.param == "max_tokens"


def test_cancelled_stream_stops_early(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=500, min_tokens=500)
    before = finished(engine.stats)
    stream = engine.submit(engine.render_chat(SPAIN), params)
    for _ in stream:
        stream.cancel()
        break
    # the engine drops the cancelled request; a new one is served right after it
    assert engine.generate(engine.render_chat(SPAIN), GREEDY).text == "The capital of Spain is Madrid."
    assert stream.completion is None
    after = finished(engine.stats)
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
    assert after.get("length", 0) == before.get("length", 0), "the cancelled request ran to its end"


def test_unknown_role_is_rejected(engine) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.render_chat([{"role": "wizard", "content": "hi"}])
    assert error.value.param == "messages[0].role"


def test_a_request_cancelled_while_queued_does_not_stop_the_engine(engine) -> None:
    prompt = engine.render_chat(SPAIN)
    before = finished(engine.stats)
    with engine_held(engine):
        running = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=200, min_tokens=200))
        queued = engine.submit(prompt, SamplingParams(temperature=0.5, max_tokens=5))  # another batch key: waits
        queued.cancel()
    running.result()
    with ThreadPoolExecutor(1) as pool:
        after = pool.submit(engine.generate, prompt, GREEDY)
        assert after.result(timeout=60).text == "The capital of Spain is Madrid."
    counts = finished(engine.stats)
    assert counts.get("cancelled", 0) - before.get("cancelled", 0) == 1  # dropped from the queue, never run


def test_token_logprobs_prefer_the_trained_answer(engine) -> None:
    prompt = engine.encode(engine.render_chat(SPAIN))
    right = engine.token_logprobs(prompt + engine.encode("The capital of Spain is Madrid."))
    wrong = engine.token_logprobs(prompt + engine.encode("The capital of Spain is Lima."))
    assert len(right) == len(prompt) + len(engine.encode("The capital of Spain is Madrid.")) - 1
    assert all(lp <= 0 for lp in right)
    assert sum(right) > sum(wrong)


def test_requests_that_keep_arriving_share_one_batch(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # This is the one behaviour defined by time, so its margins are wide: four requests 50 ms apart
    # with a 1 s window (20x), then a pause of 4 s (4x the window) that must not hold a batch back.
    engine = GenerationEngine(onnx_int4, EngineOptions(batch_wait_s=1.0, max_batch_wait_s=60.0))
    try:
        prompt = engine.encode(engine.render_chat(SPAIN))
        streams = []
        for _ in range(4):
            streams.append(engine.submit(prompt, GREEDY))
            time.sleep(0.05)
        assert {s.result().text for s in streams} == {engine.generate(prompt, GREEDY).text}
        assert engine.stats.batched_requests == 5 and engine.stats.batches == 2, "the four did not share a batch"

        first = engine.submit(prompt, GREEDY)
        time.sleep(4.0)
        second = engine.submit(prompt, GREEDY)
        first.result(), second.result()
        assert engine.stats.batches == 4
    finally:
        engine.close()


def test_a_listener_is_woken_and_polling_yields_the_whole_answer(engine) -> None:
    prompt = engine.render_chat(SPAIN)
    expected = engine.generate(prompt, GREEDY)
    woken = threading.Semaphore(0)
    stream = engine.submit(prompt, GREEDY)
    stream.listen(woken.release)  # may be set after the first events: those must be announced too
    pieces = []
    while stream.completion is None:
        assert woken.acquire(timeout=30), "no wake-up while the answer was unfinished"
        pieces.append(stream.poll())
    assert "".join(pieces) == expected.text
    assert stream.completion == expected


@pytest.mark.parametrize("scheduler", ["continuous", "genai"])
def test_requests_join_a_running_batch_without_changing_any_answer(onnx_int4, scheduler: str) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    forced = SamplingParams(temperature=0.0, max_tokens=400, min_tokens=400)
    engine = GenerationEngine(onnx_int4, EngineOptions(batch_wait_s=0, join_steps=1_000_000, scheduler=scheduler))
    try:
        assert engine.scheduler == scheduler
        prompts = [engine.encode(engine.render_chat(q)) for q in QUESTIONS[:3]]  # different lengths: padded rows
        alone = [engine.generate(p, forced) for p in prompts]
        first, late = submit_when_running(engine, (prompts[0], forced), [(p, forced) for p in prompts[1:]])
        together = [first.result(), *(s.result() for s in late)]
        assert engine.stats.joined_requests == 2 and engine.stats.batches == 4, "the late requests did not join"
        assert together == alone
    finally:
        engine.close()


@pytest.mark.parametrize("scheduler", ["continuous", "genai"])
def test_rows_held_to_different_min_tokens_share_a_batch_only_where_each_keeps_its_own(onnx_int4, scheduler) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # After its first token the running row needs 49 more at least; a newcomer would need 50. A
    # Generator has one min_length for all its rows, so the genai scheduler must not let it join;
    # the continuous one holds each row to its own min_tokens, so it joins.
    params = SamplingParams(temperature=0.0, max_tokens=400, min_tokens=50)
    engine = GenerationEngine(onnx_int4, EngineOptions(batch_wait_s=0, join_steps=1_000_000, scheduler=scheduler))
    try:
        prompt = engine.encode(engine.render_chat(SPAIN))
        first, late = submit_when_running(engine, (prompt, params), [(prompt, params)])
        answer = first.result()  # `late` is filled once `first` has produced text
        assert [answer] == [s.result() for s in late]
        assert answer.usage.completion_tokens >= 50
        joined = 1 if scheduler == "continuous" else 0
        assert engine.stats.joined_requests == joined and engine.stats.batches == 2 - joined
    finally:
        engine.close()


def submit_when_running(engine, first: tuple, later: list[tuple]) -> tuple:
    """Submit `first`; submit `later` from the engine's own thread as soon as `first` yields text,
    so they arrive while its batch is running, before the engine takes its next step (events, not
    timing: the listener runs on the engine's thread, between steps). The returned list is filled
    then: read it once `first` has produced text."""
    late: list = []

    def on_news() -> None:
        if not late:
            late.extend(engine.submit(*request) for request in later)

    with engine_held(engine):  # `first` waits until its listener is in place
        stream = engine.submit(*first)
        stream.listen(on_news)
    return stream, late


def test_a_request_cancelled_while_its_batch_gathers_leaves_the_engine_serving(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # The first request of a batch waits up to batch_wait_s for company; cancelled meanwhile, it leaves
    # the queue empty. Found by the disconnect storm: the owner thread then died popping from an
    # empty queue, and every later request hung.
    engine = GenerationEngine(onnx_int4, EngineOptions(batch_wait_s=0.5, max_batch_wait_s=0.5))
    try:
        prompt = engine.encode(engine.render_chat(SPAIN))
        stream = engine.submit(prompt, GREEDY)
        time.sleep(0.1)  # the engine is gathering a batch around it ...
        stream.cancel()
        time.sleep(2.0)  # ... and stops gathering with nothing left to run
        with ThreadPoolExecutor(1) as pool:
            after = pool.submit(engine.generate, prompt, GREEDY)
            assert after.result(timeout=60).text == "The capital of Spain is Madrid."
        assert engine.stats.finished["cancelled"] == 1
    finally:
        engine.close()


def test_a_short_request_is_answered_while_a_long_one_runs(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # No head-of-line waiting: the short request joins the running one at its next step and ends
    # while it still runs (counted in steps, not seconds: 400 forced tokens against a 40-token cap).
    engine = GenerationEngine(onnx_int4, EngineOptions(batch_wait_s=0))
    try:
        long = SamplingParams(temperature=0.0, max_tokens=400, min_tokens=400)
        prompt = engine.encode(engine.render_chat(SPAIN))
        first, late = submit_when_running(engine, (prompt, long), [(prompt, GREEDY)])
        next(iter(first))
        short = late[0].result()
        assert short.text == "The capital of Spain is Madrid." and first.completion is None
        assert first.result().usage.completion_tokens == 400 and engine.stats.joined_requests == 1
    finally:
        engine.close()


def test_a_seeded_sample_is_the_same_alone_and_beside_other_requests(onnx_int4) -> None:
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(onnx_int4)
    try:
        seeded = SamplingParams(temperature=1.5, top_k=0, seed=11, max_tokens=24)
        prompts = [engine.encode(engine.render_chat(q)) for q in QUESTIONS[:4]]
        alone = engine.generate(prompts[0], seeded)
        with engine_held(engine):
            streams = engine.submit_all(
                [(prompts[0], seeded)] + [(p, SamplingParams(temperature=1.5)) for p in prompts[1:]]
            )
        assert streams[0].result() == alone
        assert engine.stats.batches == 2 and engine.stats.batched_requests == 5, "they did not share a batch"
    finally:
        engine.close()


def test_prompts_of_different_lengths_sent_together_are_read_without_much_padding(onnx_int4) -> None:
    from slmflow.generation.engine import GenerationEngine

    # Read as one run, 4 short and 2 long prompts would compute every row to the long ones' length
    # (over 2 positions per prompt token); grouped by length, at most 1.2.
    engine = GenerationEngine(onnx_int4)
    try:
        preamble = [{"role": "system", "content": "You answer questions about capitals. " * 12}]
        chats = [*QUESTIONS[:4], *([*preamble, *q] for q in QUESTIONS[4:6])]
        prompts = [engine.encode(engine.render_chat(chat)) for chat in chats]
        assert min(map(len, prompts[4:])) > 3 * max(map(len, prompts[:4]))
        alone = [engine.generate(prompt, GREEDY) for prompt in prompts]
        tokens, positions = engine.stats.prompt_tokens, engine.stats.prompt_positions
        with engine_held(engine):
            streams = engine.submit_all([(prompt, GREEDY) for prompt in prompts])
        assert [s.result() for s in streams] == alone
        assert engine.stats.batches == 7 and engine.stats.batched_requests == 12, "they did not share a batch"
        read = engine.stats.prompt_tokens - tokens
        assert read == sum(map(len, prompts))
        assert engine.stats.prompt_positions - positions <= 1.2 * read
    finally:
        engine.close()


def test_a_temperature_near_zero_samples_the_greedy_answer(engine) -> None:
    # Logits divided by 1e-320 overflow to infinity; the sampler must still pick the top token (the
    # fuzzer found "Probabilities contain NaN" as a 500).
    prompt = engine.render_chat(SPAIN)
    tiny = SamplingParams(temperature=1e-320, max_tokens=40, seed=3)
    assert engine.generate(prompt, tiny).text == engine.generate(prompt, GREEDY).text


def test_the_kv_buffer_stays_within_its_budget_and_parked_requests_answer_as_alone(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # The smallest budget: one request at the full context (2,048 positions). Four requests of 700
    # tokens sent together outgrow it: the newest are parked and resume by reading their prompt and
    # answer so far again. The oldest is never parked, so its seeded sample is as alone too.
    engine = GenerationEngine(onnx_int4, EngineOptions(kv_cache_bytes=1))
    try:
        assert engine.scheduler == "continuous"
        layout = engine._batcher.decoder.layout
        assert engine.stats.kv_budget_bytes == engine.context_length * layout.bytes_per_token
        long = SamplingParams(temperature=0.0, max_tokens=700, min_tokens=700)
        seeded = SamplingParams(temperature=1.2, seed=5, max_tokens=700, min_tokens=700)
        requests = [
            (engine.encode(engine.render_chat(q)), seeded if i == 0 else long) for i, q in enumerate(QUESTIONS[:4])
        ]
        alone = [engine.generate(prompt, params) for prompt, params in requests]
        assert engine.stats.parked == 0
        with engine_held(engine):
            streams = engine.submit_all(requests)
        assert streams[0].result() == alone[0]  # never parked: its seeded sample too
        for (prompt, _), stream, answer in zip(requests, streams, alone, strict=True):
            assert_as_alone(engine, prompt, answer, stream.result())
        assert engine.stats.parked >= 1, "four 700-token requests fit a 2,048-position budget?"
        assert engine.stats.kv_slots_peak_bytes <= engine.stats.kv_budget_bytes
    finally:
        engine.close()


def test_a_request_parked_again_while_it_reads_its_answer_again_goes_on_as_alone(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # Within 2,048 positions: the third request is parked when the first two outgrow the budget; it
    # resumes when the first ends, and reading its answer so far again 16 tokens a step, it is parked
    # again as the second grows. It must go on from all of its answer so far, not from its prompt.
    engine = GenerationEngine(onnx_int4, EngineOptions(kv_cache_bytes=1, prefill_chunk=16))
    try:
        lengths = (1000, 1900, 1900)
        requests = [
            (engine.encode(engine.render_chat(q)), SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n))
            for q, n in zip(QUESTIONS, lengths, strict=False)
        ]
        alone = [engine.generate(prompt, params) for prompt, params in requests]
        with engine_held(engine):
            streams = engine.submit_all(requests)
        for (prompt, _), stream, answer in zip(requests, streams, alone, strict=True):
            assert_as_alone(engine, prompt, answer, stream.result())
        assert engine.stats.parked >= 2
    finally:
        engine.close()


def test_long_prompts_sent_together_are_read_one_after_the_other(onnx_int4) -> None:
    from slmflow.generation.engine import EngineOptions, GenerationEngine

    # Prompts longer than a chunk are read a chunk per step, shortest first, even when nothing
    # decodes yet: the first one's first token comes before the others are read (a chunk of each per
    # step gave every one its first token only once all were read), and answers are as alone.
    engine = GenerationEngine(onnx_int4, EngineOptions(prefill_chunk=16))
    try:
        preamble = [{"role": "system", "content": "You answer questions about capitals. " * 6}]
        prompts = [engine.encode(engine.render_chat([*preamble, *q])) for q in QUESTIONS[:3]]
        assert min(map(len, prompts)) > 3 * 16
        alone = [engine.generate(prompt, GREEDY) for prompt in prompts]
        read_at_first_token: list[int] = []
        before = engine.stats.prompt_tokens
        with engine_held(engine):
            streams = engine.submit_all([(prompt, GREEDY) for prompt in prompts])
            first = streams[0]
            first.listen(lambda: read_at_first_token.append(engine.stats.prompt_tokens - before))
        assert [s.result() for s in streams] == alone
        assert read_at_first_token[0] < sum(map(len, prompts)) - 16
    finally:
        engine.close()


def test_fresh_prompts_long_enough_to_read_in_pieces_are_read_alone(onnx_int4, monkeypatch) -> None:
    from slmflow.generation import decoder as module
    from slmflow.generation.engine import GenerationEngine

    # Fresh prompts that one read alone would take in pieces (Decoder.extend) are not padded into one
    # batched run with the others (whose attention scores every row's full S x S): each is read
    # alone, in its pieces, with no padding, and answers as alone.
    engine = GenerationEngine(onnx_int4)
    try:
        preamble = [{"role": "system", "content": "You answer questions about capitals. " * 6}]
        prompts = [engine.encode(engine.render_chat([*preamble, *q])) for q in QUESTIONS[:3]]
        monkeypatch.setattr(module, "PROMPT_PIECE", min(map(len, prompts)) // 2)
        pieces = [module.Decoder.pieces(len(prompt)) for prompt in prompts]
        assert min(pieces) >= 2 and max(map(len, prompts)) <= engine.options.prefill_chunk
        alone = [engine.generate(prompt, GREEDY) for prompt in prompts]
        reads = prompt_reads(engine._batcher.decoder, monkeypatch)
        tokens, positions = engine.stats.prompt_tokens, engine.stats.prompt_positions
        with engine_held(engine):
            streams = engine.submit_all([(prompt, GREEDY) for prompt in prompts])
        assert [s.result() for s in streams] == alone
        assert len(reads) == sum(pieces) and max(reads) < min(map(len, prompts))
        assert sum(reads) == engine.stats.prompt_tokens - tokens == sum(map(len, prompts))
        assert engine.stats.prompt_positions - positions == sum(map(len, prompts))
    finally:
        engine.close()
