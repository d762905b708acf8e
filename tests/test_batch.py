"""Batch inference on real pyspark in local mode: `slmflow batch`, `score_dataframe` and the scorer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from slmflow.batch import RESULT_COLUMNS
from slmflow.checkpoints.task import CAPITALS, EVAL_TEMPLATES, TRAIN_TEMPLATES

CHAT_URI = "models:/tiny-onnx-chat@champion"
PROMPT_URI = "models:/tiny-onnx-prompt@champion"
GREEDY = {"max_tokens": 32, "temperature": 0.0}
TOO_LONG = "word " * 3000  # the tiny model's context is 2048 tokens

pytestmark = pytest.mark.usefixtures("packaged")  # the registered @champion models


def questions(count: int) -> list[str]:
    templates = TRAIN_TEMPLATES + EVAL_TEMPLATES
    return [t.format(country=c) for t in templates for c in CAPITALS][:count]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def spark() -> Iterator:
    from slmflow.batch import spark_session

    session, started = spark_session("local[2]", progress=False)
    assert started
    yield session
    session.stop()


@pytest.fixture(scope="module")
def cli():
    from slmflow.cli import main
    from slmflow.cli.batch import batch

    main.add_command(batch)  # idempotent; the CLI registers it the same way
    return lambda *args: CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def chat_model():
    return mlflow.pyfunc.load_model(CHAT_URI)


@pytest.fixture(scope="module")
def prompt_model():
    return mlflow.pyfunc.load_model(PROMPT_URI)


def worker_engines(spark) -> dict[tuple[int, str], tuple[int, int, int]]:
    """(pid, model uuid) -> (batches, requests, intra-op threads) of each Python worker's cached engines.

    Two tasks that each wait a second run at once, so both local[2] workers answer.
    """

    def report(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import os

        from slmflow import batch

        for _ in frames:
            time.sleep(1)
        engines = {key: scorer.pyfunc.engine for key, scorer in batch._SCORERS.items()}
        rows = [
            (os.getpid(), key, e.stats.batches, e.stats.batched_requests, e.options.intra_op_threads)
            for key, e in engines.items()
        ]
        yield pd.DataFrame(rows, columns=["pid", "model", "batches", "requests", "threads"])

    schema = "pid long, model string, batches long, requests long, threads long"
    rows = spark.range(0, 2, numPartitions=2).mapInPandas(report, schema).collect()
    return {(r.pid, r.model): (r.batches, r.requests, r.threads) for r in rows}


def test_cli_scores_200_chat_prompts_like_direct_predict(spark, cli, chat_model, tmp_path: Path) -> None:
    texts = questions(200)
    records = [{"id": i, "messages": user(t)} for i, t in enumerate(texts)]
    records.insert(17, {"id": 1000, "messages": user(TOO_LONG)})
    records.insert(150, {"id": 1001, "messages": []})
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "answers.parquet"

    before = worker_engines(spark)
    start = time.perf_counter()
    run = cli("batch", CHAT_URI, "--input", str(source), "--output", str(output), "--master", "local[2]",
              "--partitions", "4", "--params", json.dumps(GREEDY), "--json")  # fmt: skip
    seconds = time.perf_counter() - start
    assert run.exit_code == 0, run.output
    after = worker_engines(spark)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["rows"], result["error_rows"]) == (202, 2)

    answers = pd.read_parquet(output)
    assert answers["id"].tolist() == [r["id"] for r in records], "output rows are not in input order"
    failed = answers[answers["error"].notna()]
    assert failed["id"].tolist() == [1000, 1001]
    assert "context" in failed["error"].iloc[0] and failed["completion"].isna().all()
    good = answers[answers["error"].isna()]
    for row in good.itertuples():
        direct = chat_model.predict({"messages": user(texts[row.id])}, params=GREEDY)[0]
        choice = direct["choices"][0]
        assert (row.completion, row.finish_reason) == (choice["message"]["content"], choice["finish_reason"]), row.id
        usage = direct["usage"]
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"]), (
            row.id
        )
    assert good.set_index("id").loc[0, "completion"] == "The capital of Spain is Madrid."

    # 4 tasks, each of which has MLflow load the model: 2 engines (one per worker, one intra-op
    # thread per task's core) served them all, in batches.
    served = {}
    for key, (batches, requests, threads) in after.items():
        old_batches, old_requests, _ = before.get(key, (0, 0, 0))
        if requests > old_requests:
            served[key] = (batches - old_batches, requests - old_requests, threads)
    assert len(served) <= 2, f"more engines than local[2] workers served the job: {served}"
    batches, requests, threads = (sum(counts) for counts in zip(*served.values(), strict=True))
    assert requests == 200, f"{requests} engine requests for 200 good rows"
    assert requests / batches >= 4, f"{batches} engine batches for {requests} rows: rows were not batched"
    assert threads == len(served), f"engines of local[2] tasks should run 1 intra-op thread each: {served}"

    client = mlflow.MlflowClient()
    logged = client.get_run(result["run_id"]).data
    assert logged.params["model_uri"] == CHAT_URI and logged.params["master"] == "local[2]"
    assert logged.params["rows"] == "202" and logged.params["input"] == str(source)
    assert logged.metrics["rows"] == 202 and logged.metrics["error_rows"] == 2
    assert logged.metrics["tokens"] == good["completion_tokens"].sum()
    assert 0 < logged.metrics["seconds"] < seconds
    assert logged.metrics["tokens_per_s"] == pytest.approx(logged.metrics["tokens"] / logged.metrics["seconds"])
    artifacts = [a.path for a in client.list_artifacts(result["run_id"], "output")]
    assert artifacts and all(Path(a).name.startswith("part-") for a in artifacts)


def test_csv_and_parquet_inputs_to_jsonl_with_the_prompt_task(spark, cli, prompt_model, tmp_path: Path) -> None:
    prompts = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n" for q in questions(12)]
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(len(prompts))], "prompt": prompts})
    frame.loc[5, "prompt"] = ""  # an empty CSV field is a null prompt
    frame.loc[7, "prompt"] = 'a "quoted", comma prompt'
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_parquet(tmp_path / "in.parquet")
    params = {"max_tokens": 3}
    expected = {i: prompt_model.predict({"prompt": p}, params=params)[0] for i, p in enumerate(frame["prompt"]) if p}

    for source in ("in.csv", "in.parquet"):
        output = tmp_path / f"{source}.jsonl"
        run = cli("batch", PROMPT_URI, "--input", str(tmp_path / source), "--output", str(output),
                  "--column", "prompt", "--params", json.dumps(params), "--json")  # fmt: skip
        assert run.exit_code == 0, run.output
        lines = [
            json.loads(line) for part in sorted(output.glob("part-*.json")) for line in part.read_text().splitlines()
        ]
        assert [line["key"] for line in lines] == frame["key"].tolist()
        assert all(list(line) == ["key", "prompt", *RESULT_COLUMNS] for line in lines)
        assert lines[5]["error"] and lines[5]["completion"] is None
        for i, line in enumerate(lines):
            if i != 5:
                assert line["error"] is None and line["completion"] == expected[i], (source, i)
        assert lines[0]["finish_reason"] == "length" and lines[0]["completion_tokens"] == 3
        assert lines[7]["prompt"] == 'a "quoted", comma prompt' and "\n" in lines[0]["prompt"]


def test_score_dataframe_wraps_a_string_column_as_a_user_message(spark, chat_model) -> None:
    from slmflow.batch import score_dataframe

    questions = [(1, "What is the capital of Spain?"), (2, "capital of Peru?"), (3, None)]
    df = spark.createDataFrame(questions, "n int, question string")
    rows = score_dataframe(df, CHAT_URI, column="question", params={"max_tokens": 16}).orderBy("n").collect()
    assert [r.n for r in rows] == [1, 2, 3] and rows[0].question == "What is the capital of Spain?"
    assert rows[0].completion == "The capital of Spain is Madrid." and rows[0].finish_reason == "stop"
    direct = chat_model.predict({"messages": user("capital of Peru?")}, params={"max_tokens": 16})[0]
    assert rows[1].completion == direct["choices"][0]["message"]["content"]
    assert rows[2].completion is None and rows[2].error


def test_the_real_model_answers_on_spark_as_through_pyfunc(spark, smol_default: dict) -> None:
    """SmolLM2-135M-Instruct (registered by the smol_default fixture) in the Spark workers: everyday
    questions answered with their facts, each as the same model answers it alone through pyfunc, and a
    prompt over its 8,192-token context refused in its row."""
    from slmflow.batch import score_dataframe

    facts = {
        "What is 2+2?": "4",
        "Who wrote Romeo and Juliet?": "Shakespeare",
        "What is the chemical symbol for gold?": "Au",
    }
    rows = [(i, q) for i, q in enumerate(facts)] + [(len(facts), "word " * 9000)]
    df = spark.createDataFrame(rows, "n int, question string")
    params = {"max_tokens": 48, "temperature": 0.0}
    scored = score_dataframe(df, "models:/smol@champion", column="question", params=params).orderBy("n").collect()
    model = mlflow.pyfunc.load_model("models:/smol@champion")
    for row, (question, fact) in zip(scored, facts.items(), strict=False):
        assert row.error is None and fact in row.completion, row
        alone = model.predict({"messages": user(question)}, params=params)[0]["choices"][0]
        assert (row.completion, row.finish_reason) == (alone["message"]["content"], alone["finish_reason"]), row
    assert scored[-1].completion is None and "context" in scored[-1].error


def test_user_errors_are_one_line_before_any_scoring(spark, cli, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    out = str(tmp_path / "out.parquet")
    (tmp_path / "taken.jsonl").mkdir()
    cases = {
        ("--output", str(tmp_path / "taken.jsonl")): "taken.jsonl already exists",
        ("--output", str(tmp_path / "out.csv")): "cannot tell the output format",
        ("--output", out, "--params", "{"): "--params is not valid JSON",
        ("--output", out, "--params", '{"max_tokens": -1}'): "max_tokens must be at least 1",
        ("--output", out, "--params", '{"n": 2}'): "unknown param(s) n",
        ("--output", out, "--column", "text"): "the input has no column 'text'; its columns: id, prompt",
        ("--output", out, "--column", "id"): "column 'id' holds bigint; this model takes a string or a messages array",
    }
    for args, message in cases.items():
        run = cli("batch", CHAT_URI, "--input", str(source), *args)
        assert run.exit_code == 1, run.output
        last = run.stderr.strip().splitlines()[-1]  # after the model's download progress, if any
        assert last.startswith("error: ") and message in last and "Traceback" not in run.stderr, run.stderr
    assert not Path(out).exists()


def test_scorer_isolates_bad_rows_batches_the_rest_and_respects_the_queue(onnx_int4: Path) -> None:
    from slmflow.batch import BatchScorer
    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.onnx_genai.pyfunc import OnnxGenAIPyfunc

    prompts = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n" for q in questions(16)]
    frame = pd.DataFrame({"prompt": [*prompts, "", TOO_LONG]})
    engines = [GenerationEngine(onnx_int4), GenerationEngine(onnx_int4, EngineOptions(max_queue=4))]
    try:
        unbounded, queue_of_4 = (BatchScorer(OnnxGenAIPyfunc(e, task="prompt")).predict(frame, GREEDY) for e in engines)
        # 16 rows submitted together run batched (one by one, they would take 16 batches).
        assert engines[0].stats.batched_requests == 16 and engines[0].stats.batches <= 4, engines[0].stats
        assert unbounded == queue_of_4, "chunking to the queue's size changed answers"
        records = [json.loads(r) for r in unbounded]
        assert [r["error"] is None for r in records] == [True] * 16 + [False, False]
        assert "context" in records[-1]["error"] and records[-1]["prompt_tokens"] is None
        direct = OnnxGenAIPyfunc(engines[0], task="prompt").predict(prompts[:3], GREEDY)
        assert [r["completion"] for r in records[:3]] == direct
    finally:
        for engine in engines:
            engine.close()
