"""The onnx_genai flavor: save/load round trip, both tasks, streaming, batches, threads, bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from slmflow import onnx_genai
from slmflow.errors import SlmflowError
from slmflow.onnx_genai.schema import CHAT_EXAMPLE, PROMPT_EXAMPLE

JOKE = "Why can't you trust an atom? Because they make up everything!"


@pytest.fixture(scope="session")
def chat_model_path(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flavor") / "chat"
    onnx_genai.save_model(onnx_int4, path, task="chat", generation_defaults={"max_tokens": 64, "model_name": "tiny"})
    return path


@pytest.fixture(scope="session")
def prompt_model_path(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flavor") / "prompt"
    onnx_genai.save_model(onnx_int4, path, task="prompt")
    return path


@pytest.fixture(scope="session")
def chat_model(chat_model_path: Path):
    return mlflow.pyfunc.load_model(str(chat_model_path))


@pytest.fixture(scope="session")
def prompt_model(prompt_model_path: Path):
    return mlflow.pyfunc.load_model(str(prompt_model_path))


def test_chat_answers_the_tutorial_input_verbatim(chat_model) -> None:
    response = chat_model.predict(CHAT_EXAMPLE)
    assert response[0]["choices"][0]["message"]["content"] == "The capital of Spain is Madrid."
    assert response[0]["choices"][0]["finish_reason"] == "stop"
    usage = response[0]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response[0]["object"] == "chat.completion" and response[0]["model"] == "tiny"


def test_prompt_task_answers_the_tutorial_input_verbatim(prompt_model) -> None:
    assert prompt_model.predict(PROMPT_EXAMPLE) == [JOKE]


def test_every_row_of_a_batch_is_answered(chat_model, prompt_model) -> None:
    countries = ["Spain", "France", "Japan"]
    frame = pd.DataFrame(
        {"messages": [[{"role": "user", "content": f"What is the capital of {c}?"}] for c in countries]}
    )
    answers = [r["choices"][0]["message"]["content"] for r in chat_model.predict(frame)]
    assert answers == [
        "The capital of Spain is Madrid.",
        "The capital of France is Paris.",
        "The capital of Japan is Tokyo.",
    ]
    prompts = pd.DataFrame({"prompt": [PROMPT_EXAMPLE["prompt"], "<|user|>\ncapital of Peru?<|end|>\n<|assistant|>\n"]})
    assert prompt_model.predict(prompts) == [JOKE, "The capital of Peru is Lima."]


def test_per_call_params_and_row_fields(chat_model, prompt_model) -> None:
    by_params = chat_model.predict(CHAT_EXAMPLE, params={"max_tokens": 3})
    assert by_params[0]["choices"][0]["finish_reason"] == "length"
    assert by_params[0]["usage"]["completion_tokens"] == 3
    by_row = chat_model.predict({**CHAT_EXAMPLE, "stop": ["Madrid"]})
    assert by_row[0]["choices"][0]["message"]["content"] == "The capital of Spain is "
    assert prompt_model.predict(PROMPT_EXAMPLE, params={"stop": ["atom"]}) == ["Why can't you trust an "]


def test_n_returns_several_choices(chat_model) -> None:
    response = chat_model.predict({**CHAT_EXAMPLE, "n": 2})
    assert [c["index"] for c in response[0]["choices"]] == [0, 1]
    assert {c["message"]["content"] for c in response[0]["choices"]} == {"The capital of Spain is Madrid."}


def test_predict_stream_yields_openai_chunks(chat_model, prompt_model) -> None:
    chunks = list(chat_model.predict_stream(CHAT_EXAMPLE))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "The capital of Spain is Madrid."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len(chunks) > 3, "streaming delivered the answer in one piece"
    assert "".join(prompt_model.predict_stream(PROMPT_EXAMPLE)) == JOKE


def test_concurrent_predict_calls_equal_sequential_ones(chat_model) -> None:
    inputs = [
        {"messages": [{"role": "user", "content": f"What is the capital of {c}?"}]}
        for c in ("Spain", "France", "Japan", "Kenya", "Peru", "Norway")
    ]
    sequential = [chat_model.predict(i)[0]["choices"][0]["message"]["content"] for i in inputs]
    with ThreadPoolExecutor(len(inputs)) as pool:
        concurrent = list(pool.map(lambda i: chat_model.predict(i)[0]["choices"][0]["message"]["content"], inputs))
    assert concurrent == sequential
    assert sequential[1] == "The capital of France is Paris."


def test_mlmodel_is_a_well_formed_flavor_with_code_and_no_pickles(chat_model_path: Path) -> None:
    mlmodel = yaml.safe_load((chat_model_path / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "slmflow.onnx_genai"
    flavor = mlmodel["flavors"]["onnx_genai"]
    assert flavor["task"] == "chat" and flavor["model_dir"] == "model"
    assert (chat_model_path / flavor["code"] / "slmflow" / "generation" / "engine.py").is_file()
    assert (chat_model_path / "model" / "genai_config.json").is_file()
    assert not [p for p in chat_model_path.rglob("*") if p.suffix in {".pkl", ".pickle", ".cloudpickle"}]
    requirements = (chat_model_path / "requirements.txt").read_text()
    assert "onnxruntime-genai==" in requirements and "torch" not in requirements
    assert mlmodel["signature"]["inputs"] and "seed" in mlmodel["signature"]["inputs"]


def test_native_load_model_returns_the_engine(chat_model_path: Path) -> None:
    from slmflow.generation.engine import GenerationEngine

    engine = onnx_genai.load_model(str(chat_model_path))
    try:
        assert isinstance(engine, GenerationEngine)
        assert engine.generate(engine.render_chat(CHAT_EXAMPLE["messages"])).text == "The capital of Spain is Madrid."
    finally:
        engine.close()


@pytest.mark.parametrize(
    "bad_input",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {**CHAT_EXAMPLE, "temperature": -1.0},
        {**CHAT_EXAMPLE, "max_tokens": 100000},
    ],
)
def test_bad_chat_input_raises_a_clear_mlflow_error(chat_model, bad_input: dict) -> None:
    with pytest.raises(MlflowException) as error:
        chat_model.predict(bad_input)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "\n" not in error.value.message.strip()


def test_save_rejects_a_folder_that_is_not_onnx_genai(tmp_path: Path) -> None:
    with pytest.raises(MlflowException, match=r"genai_config\.json"):
        onnx_genai.save_model(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_rejects_an_unknown_task_and_leaves_nothing(onnx_int4: Path, tmp_path: Path) -> None:
    with pytest.raises(MlflowException, match="Unknown task"):
        onnx_genai.save_model(onnx_int4, tmp_path / "out", task="summarize")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_non_empty_target(onnx_int4: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MlflowException, match="already exists"):
        onnx_genai.save_model(onnx_int4, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_more_rows_than_the_queue_holds_are_all_answered(chat_model_path: Path) -> None:
    model = mlflow.pyfunc.load_model(str(chat_model_path), model_config={"max_queue": 4})
    frame = pd.DataFrame({"messages": [[{"role": "user", "content": "What is the capital of Peru?"}]] * 9})
    answers = [r["choices"][0]["message"]["content"] for r in model.predict(frame)]
    assert answers == ["The capital of Peru is Lima."] * 9


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_batch_size": 0}, "engine option max_batch_size must be a whole number >= 1; got 0"),
        ({"max_batch_size": "many"}, "engine option max_batch_size must be a whole number >= 1; got 'many'"),
        ({"prefill_chunk": 8}, "engine option prefill_chunk must be a whole number >= 16; got 8"),
        ({"prefill_graph_decode_rows": -1}, "prefill_graph_decode_rows must be a whole number >= 0; got -1"),
        ({"scheduler": "fast"}, "unknown scheduler 'fast'"),
    ],
)
def test_a_bad_engine_option_in_model_config_is_refused_by_name(
    chat_model_path: Path, config: dict, message: str
) -> None:
    # A zero batch size had loaded and then hung every request; a string, a thread's traceback.
    with pytest.raises(SlmflowError) as refused:
        mlflow.pyfunc.load_model(str(chat_model_path), model_config=config)
    assert message in str(refused.value)


def test_a_dropped_model_stops_its_engine(chat_model_path: Path) -> None:
    import gc

    model = mlflow.pyfunc.load_model(str(chat_model_path))
    engine = model.get_raw_model()
    del model
    gc.collect()
    assert not engine._thread.is_alive()


def test_predict_records_spans_when_the_caller_traces(chat_model) -> None:
    previous = mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id()).name
    experiment = mlflow.set_experiment("pyfunc-spans").experiment_id
    try:

        @mlflow.trace
        def ask() -> tuple[str, str]:
            whole = chat_model.predict(CHAT_EXAMPLE)[0]["choices"][0]["message"]["content"]
            chunks = chat_model.predict_stream(CHAT_EXAMPLE)
            streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            return whole, streamed

        assert ask() == ("The capital of Spain is Madrid.", "The capital of Spain is Madrid.")
        chat_model.predict(CHAT_EXAMPLE)  # not inside a trace: records nothing
        mlflow.flush_trace_async_logging()
        [trace] = mlflow.search_traces(locations=[experiment], return_type="list")
    finally:
        mlflow.set_experiment(previous)
    spans = {span.name: span for span in trace.data.spans}
    assert set(spans) == {"ask", "onnx_genai.predict", "onnx_genai.predict_stream"}
    root_id = spans["ask"].span_id
    assert spans["onnx_genai.predict"].parent_id == root_id and spans["onnx_genai.predict_stream"].parent_id == root_id
    assert spans["onnx_genai.predict"].inputs["model_input"] == [CHAT_EXAMPLE]  # the rows MLflow handed over
    assert (
        spans["onnx_genai.predict"].outputs[0]["choices"][0]["message"]["content"] == "The capital of Spain is Madrid."
    )
    assert spans["onnx_genai.predict_stream"].outputs == {
        "text": "The capital of Spain is Madrid.",
        "finish_reason": "stop",
    }
