"""The real model, end to end: SmolLM2-135M-Instruct from its GGUF -> package -> registry -> pyfunc and
`slmflow serve`, with the conversion's quality measured, and a quality budget that refuses a bad build.

Questions are the everyday kind; answers are greedy and checked for the fact they must contain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from slmflow.cli import main
from slmflow.server import ServerSettings
from tests.conftest import engine_held, prompt_reads
from tests.server.conftest import LiveServer, serve, traces_by_request

NAME = "smol"  # registered @champion by the smol_default fixture (tests/conftest.py)
SERVED = "smol-served"  # the experiment of the served requests' traces
# Question -> what a right answer contains. All three are answered right by the float source and by
# the default (int8) build. ("What is the capital of France?" is answered right by the source and
# fp32, but its first token wins by 0.08 logits and int8 flips it: see the fp32 test.)
FACTS = {
    "What is 2+2?": "4",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the chemical symbol for gold?": "Au",
}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def champion_folder(smol_default: dict) -> Path:
    """The registered default package's ONNX Runtime GenAI folder, downloaded once."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    return local / mlflow.models.Model.load(str(local)).flavors["onnx_genai"]["model_dir"]


@pytest.fixture(scope="module")
def smol_server(smol_default: dict) -> Iterator[LiveServer]:
    yield from serve(ServerSettings(model_uri=f"models:/{NAME}@champion", trace_experiment=SERVED))


def test_the_gguf_is_packaged_at_the_default_precision_within_its_quality_budget(smol_default: dict) -> None:
    run = MlflowClient().get_run(smol_default["run_id"])
    assert run.data.params["source_kind"] == "gguf" and run.data.params["architecture"] == "llama"
    assert run.data.params["precision"] == "int8" and run.data.params["prefill_graph"] == "True"
    quality = smol_default["quality"]
    assert quality == {k.removeprefix("quality."): v for k, v in run.data.metrics.items() if k.startswith("quality.")}
    assert run.data.params["decode_graph"] == "smoothed int8, block 64"
    # The default build's quality, measured on this real model with prompts read by the prefill graph
    # (int8 activations, smoothed): +0.67% perplexity over the source (OpenVINO GenAI's int8: +0.69%);
    # through the decode graph (smoothed, block 64): -0.21% (the builder's block 32 graph was +0.25%,
    # its block 128 +0.42%). On this 515-token text the prefill graph's figure moves by tenths of a
    # point between builds that are the same in exact arithmetic (last-bit differences cross int8
    # rounding steps and grow over 30 layers): four such builds gave -0.04%, +0.25%, +0.60%, +0.67%.
    assert abs(quality["perplexity_increase_pct"]) < 1.0, quality
    assert quality["decode_graph_increase_pct"] < 0.5, quality
    assert quality["top1_agreement"] > 0.9, quality
    assert run.data.metrics["gguf_dequantize_seconds"] > 0


def test_the_registered_model_answers_everyday_questions_through_pyfunc(smol_default: dict) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    rows = [{"messages": ask(question)} for question in FACTS]
    answers = model.predict(rows, params={"temperature": 0.0, "max_tokens": 48})
    for (question, fact), answer in zip(FACTS.items(), answers, strict=True):
        assert fact in answer["choices"][0]["message"]["content"], (question, answer)


def test_slmflow_serve_answers_them_through_the_openai_client(smol_server: LiveServer) -> None:
    client = smol_server.client()
    for question, fact in FACTS.items():
        answer = client.chat.completions.create(model=NAME, messages=ask(question), temperature=0, max_tokens=48)
        assert fact in answer.choices[0].message.content, (question, answer)
        assert answer.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(
        model=NAME, messages=ask("What is 2+2?"), temperature=0, max_tokens=48, stream=True
    )
    assert "4" in "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)


def test_served_answers_replay_exactly_on_the_version_that_served_them(smol_server: LiveServer, tmp_path: Path) -> None:
    """Monitoring feeds evaluation: requests served whole, cut by max_tokens or a stop sequence, or
    sampled with a seed, exported from their traces and answered again by `slmflow eval`."""
    client = smol_server.client()
    served = {}
    for question, params, finish in (
        ("Who wrote Romeo and Juliet?", {"max_tokens": 6, "temperature": 0}, "length"),
        ("What is the chemical symbol for gold?", {"stop": ["Au"], "temperature": 0, "max_tokens": 48}, "stop"),
        ("What is 2+2?", {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 24}, None),
    ):
        raw = client.chat.completions.with_raw_response.create(model=NAME, messages=ask(question), **params)
        answer = raw.parse().choices[0]
        assert finish in (None, answer.finish_reason), answer
        assert "Au" not in answer.message.content or "stop" not in params, answer  # cut before the stop
        served[raw.headers["x-request-id"]] = (question, params, answer.message.content)
    traces_by_request(SERVED, served)
    output = tmp_path / "served.jsonl"
    run = invoke("traces", "export", SERVED, "--output", str(output), "--json")
    assert run.exit_code == 0, run.output
    rows = {row["trace_id"]: row for row in map(json.loads, output.read_text().splitlines())}
    version = str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)
    assert all(row["model_version"] == version for row in rows.values())
    exported = {(row["messages"][-1]["content"], row["expected"]): row.get("params") for row in rows.values()}
    for question, params, answer in served.values():
        assert exported[(question, answer)] == params
    # Every request in the experiment (the other tests' too: greedy, some streamed) answered again as served.
    run = invoke("eval", f"models:/{NAME}@champion", "--data", str(output), "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["metrics"]["accuracy"] == 1.0


def test_fp32_onnx_gives_the_sources_greedy_answers(smol_checkpoint: Path) -> None:
    run = invoke("package", str(smol_checkpoint), "--precision", "fp32", "--name", f"{NAME}-fp32", "--json")
    assert run.exit_code == 0, run.output
    quality = json.loads(run.stdout.strip().splitlines()[-1])["quality"]
    assert quality["greedy_agreement"] >= 0.95, quality  # torch float32 vs ONNX fp32, 20 everyday prompts
    assert abs(quality["perplexity_increase_pct"]) < 0.1, quality
    model = mlflow.pyfunc.load_model(f"models:/{NAME}-fp32/1")
    answer = model.predict({"messages": ask("What is the capital of France?"), "temperature": 0.0, "max_tokens": 24})
    assert "Paris" in answer[0]["choices"][0]["message"]["content"]


def test_the_transformers_route_answers_as_the_float_source(smol_transformers: dict, smol_checkpoint: Path) -> None:
    """The GGUF packaged by MLflow's transformers flavor gives, through pyfunc, the very greedy answers
    of the float checkpoint it was dequantized into, read by transformers directly."""
    import torch
    import transformers

    assert MlflowClient().get_run(smol_transformers["run_id"]).data.params["source_kind"] == "gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol_checkpoint)
    source = transformers.AutoModelForCausalLM.from_pretrained(smol_checkpoint, dtype=torch.float32)
    model = mlflow.pyfunc.load_model("models:/smol-hf@champion")
    for question, fact in FACTS.items():
        prompt = tokenizer.apply_chat_template(
            ask(question), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        ids = prompt["input_ids"]
        with torch.no_grad():
            greedy = source.generate(ids, max_new_tokens=48, do_sample=False)
        expected = tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
        [answer] = model.predict({"messages": ask(question), "max_tokens": 48})
        assert answer["choices"][0]["message"]["content"] == expected.strip(), (question, expected)
        assert fact in expected, (question, expected)


def test_a_build_over_its_quality_budget_fails_its_run_and_registers_nothing(smol_checkpoint: Path) -> None:
    # The former int4 default (plain RTN, 128-wide blocks): about +80% perplexity on this model.
    run = invoke(
        "package", str(smol_checkpoint), "--precision", "int4", "--quant-algo", "rtn", "--block-size", "128",
        "--mixed-precision", "none", "--max-quality-loss", "15", "--name", f"{NAME}-over-budget",
    )  # fmt: skip
    assert run.exit_code == 1
    error = run.stderr.strip()
    assert error.startswith("error: int4") and "over the budget of 15%" in error and len(error.splitlines()) == 1
    measured = float(error.split("raised perplexity by ")[1].split("%")[0])
    assert measured > 15
    [failed] = mlflow.search_runs(
        search_all_experiments=True, filter_string="params.max_quality_loss_pct = '15.0'", output_format="list"
    )
    assert failed.info.status == "FAILED"
    assert failed.data.metrics["quality.perplexity_increase_pct"] == pytest.approx(measured, abs=0.01)
    assert not MlflowClient().search_registered_models(f"name = '{NAME}-over-budget'")
    assert not [a for a in MlflowClient().list_artifacts(failed.info.run_id) if a.path == "model"]


def first_prompt_tokens(answers: dict[str, list]) -> int:
    return answers["reusing"][0].usage.prompt_tokens


def test_a_continuing_conversation_answers_as_without_prefix_reuse(champion_folder: Path) -> None:
    from importlib.resources import files

    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.generation.params import SamplingParams

    text = files("slmflow.data").joinpath("reference.txt").read_text()[:1500]
    turns = [f"Here is a text:\n{text}\nWhat is it about?", *FACTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    answers: dict[str, list] = {}
    batched: dict[str, list] = {}
    for name, options in {"reusing": EngineOptions(), "fresh": EngineOptions(prefix_cache_bytes=0)}.items():
        engine = GenerationEngine(champion_folder, options)
        try:
            messages: list[dict[str, str]] = []
            for turn in turns:
                messages.append({"role": "user", "content": turn})
                completion = engine.generate(engine.render_chat(messages), greedy)
                messages.append({"role": "assistant", "content": completion.text})
                answers.setdefault(name, []).append(completion)
            if name == "reusing":
                assert engine.stats.prefix_hits == len(turns) - 1
            # Three questions about the same text at once: one batch, each reading only its question.
            hits = engine.stats.prefix_hits
            prompts = [engine.render_chat([{"role": "user", "content": turns[0] + " " + q}]) for q in FACTS]
            with engine_held(engine):
                streams = engine.submit_all([(p, greedy) for p in prompts])
            batched[name] = [stream.result() for stream in streams]
            if name == "reusing":
                assert engine.stats.prefix_hits == hits + 3
                assert all(c.usage.cached_tokens >= first_prompt_tokens(answers) - 8 for c in batched[name])
        finally:
            engine.close()
    assert [c.token_ids for c in batched["reusing"]] == [c.token_ids for c in batched["fresh"]]
    assert [c.token_ids for c in answers["reusing"]] == [c.token_ids for c in answers["fresh"]]
    first, *later = answers["reusing"]
    assert first.usage.prompt_tokens >= 256  # long enough to be kept
    previous = first
    for completion in later:  # each turn reads only the previous answer and the new message
        assert completion.usage.cached_tokens == previous.usage.prompt_tokens
        previous = completion


def test_sixteen_requests_at_once_decode_on_the_prefill_graph_and_answer_right(champion_folder: Path) -> None:
    from slmflow.generation.engine import GenerationEngine
    from slmflow.generation.params import SamplingParams

    engine = GenerationEngine(champion_folder)
    try:
        assert engine.options.prefill_graph_decode_rows <= 16
        questions = ([*FACTS] * 6)[:16]
        greedy = SamplingParams(temperature=0.0, max_tokens=48)
        requests = [(engine.encode(engine.render_chat(ask(question))), greedy) for question in questions]
        with engine_held(engine):
            streams = engine.submit_all(requests)
        answers = [stream.result() for stream in streams]
        assert engine.stats.prefill_graph_decode_steps > 0
        for question, (ids, _), answer in zip(questions, requests, answers, strict=True):
            assert FACTS[question] in answer.text, (question, answer.text)
            # Greedy on the prefill graph's kernels: the tokens teacher-forced scoring (the same
            # graph) ranks first. Measured: 0.94-1.0 per answer, against 0.91-1.0 decoding on the
            # decoder graph.
            top = engine.score([*ids, *answer.token_ids]).top_tokens[len(ids) - 1 :]
            assert sum(a == b for a, b in zip(top, answer.token_ids, strict=True)) / len(top) >= 0.9
    finally:
        engine.close()


def test_long_fresh_prompts_read_in_pieces_answer_as_when_read_whole(
    champion_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.resources import files

    from slmflow.generation import decoder as module
    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.generation.params import SamplingParams

    engine = GenerationEngine(champion_folder, EngineOptions(prefix_cache_bytes=0))  # each read whole
    try:
        text = files("slmflow.data").joinpath("reference.txt").read_text()

        def prompt(chars: int) -> list[int]:
            return engine.encode(engine.render_chat(ask(f"Here is a text:\n{text[:chars]}\n\nWhat is 2+2?")))

        ids = prompt(next(n for n in range(len(text), 0, -50) if len(prompt(n)) <= 500))
        assert 1.75 * module.PROMPT_PIECE <= len(ids) <= engine.options.prefill_chunk  # one read, 2 pieces
        reads = prompt_reads(engine._batcher.decoder, monkeypatch)
        greedy = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24)
        pieces = engine.submit(ids, greedy).result()
        assert reads == [len(ids) // 2, len(ids) - len(ids) // 2]
        monkeypatch.setattr(module, "PROMPT_PIECE", 10**6)
        reads.clear()
        whole = engine.submit(ids, greedy).result()
        assert reads == [len(ids)]
        # The same sums grouped otherwise: the logits equal to float32 rounding (measured: identical).
        # (Not checked for the fact: after ~500 tokens of another text, this 135M model answers
        # "10" either way.)
        assert pieces.token_ids == whole.token_ids
        # Two such prompts sent together: not one batched run padded to the longer one, but read
        # alone, shortest first: the shorter in its two pieces, the longer in what is left of the
        # step's chunk, then the rest; each answers as alone.
        monkeypatch.undo()
        other = prompt(next(n for n in range(len(text), 0, -50) if len(prompt(n)) < len(ids) - 20))
        assert len(other) >= 1.75 * module.PROMPT_PIECE
        alone = engine.submit(other, greedy).result()
        reads = prompt_reads(engine._batcher.decoder, monkeypatch)
        with engine_held(engine):
            both = engine.submit_all([(ids, greedy), (other, greedy)])
        assert [s.result().token_ids for s in both] == [pieces.token_ids, alone.token_ids]
        left = engine.options.prefill_chunk - len(other)
        assert reads == [len(other) // 2, len(other) - len(other) // 2, left, len(ids) - left]
    finally:
        engine.close()


def test_requests_parked_to_keep_the_kv_budget_go_on_as_the_model_would(champion_folder: Path) -> None:
    from importlib.resources import files

    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.generation.params import SamplingParams

    # The smallest budget: one request at the full context (8,192 positions). Five prompts of about
    # 1,500 tokens fit (5 x 1,536 positions); within their first 40 answer tokens they outgrow it, and
    # the newest is parked until the others end: most of its answer comes after it resumed.
    engine = GenerationEngine(champion_folder, EngineOptions(kv_cache_bytes=1))
    try:
        assert engine.stats.kv_budget_bytes == engine.context_length * engine._batcher.decoder.layout.bytes_per_token
        data = files("slmflow.data")
        text = "\n".join(data.joinpath(name).read_text() for name in ("calibration.txt", "reference.txt") * 2)

        def prompt(question: str, chars: int) -> list[int]:
            return engine.encode(engine.render_chat(ask(f"Here is a text:\n{text[:chars]}\n\n{question}")))

        chars = next(n for n in range(len(text), 0, -50) if len(prompt("What is 2+2?", n)) <= 1520)
        forced = SamplingParams(temperature=0.0, max_tokens=100, min_tokens=100)
        requests = [(prompt(question, chars), forced) for question in [*FACTS, *FACTS][:5]]
        assert all(1496 < len(ids) < 1536 for ids, _ in requests)
        with engine_held(engine):
            streams = engine.submit_all(requests)
        answers = [stream.result() for stream in streams]
        assert engine.stats.parked >= 1
        assert engine.stats.kv_slots_peak_bytes <= engine.stats.kv_budget_bytes
        for (ids, _), answer in zip(requests, answers, strict=True):
            assert answer.usage.completion_tokens == 100
            # A resumed row goes on as the model would from its own text: its greedy tokens are the
            # ones teacher-forced scoring ranks first (a corrupted KV would not be; near-ties may flip,
            # as scoring reads with the prompt graph). Not where scoring ranks the end of the turn
            # first: min_tokens forbids it, and the row takes the best of the rest.
            scores = engine.score([*ids, *answer.token_ids])
            n = len(ids) - 1
            free = [
                (top, top_logprob - logprob, token)
                for top, top_logprob, logprob, token in zip(
                    scores.top_tokens[n:], scores.top_logprobs[n:], scores.logprobs[n:], answer.token_ids, strict=True
                )
                if top not in engine.eos_token_ids
            ]
            agreement = sum(top == token for top, _, token in free) / len(free)
            assert agreement >= 0.9, agreement
            # Where they differ, a near-tie between the two graphs' roundings (measured up to 0.74
            # nats), not a clear miss.
            assert max(gap for _, gap, _ in free) < 1.5, sorted(gap for _, gap, _ in free)[-5:]
    finally:
        engine.close()
