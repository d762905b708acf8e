"""`slmflow serve` and `slmflow chat`, as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import openai
import pytest
from click.testing import CliRunner

from slmflow.cli.serve import chat, serve
from tests.conftest import free_port
from tests.server.conftest import MADRID, SPAIN, healthy, wait_until

# `slmflow serve`, registered in the main group (which turns user errors into one line).
MAIN = "from slmflow.cli import main; from slmflow.cli.serve import serve; main.add_command(serve); main()"


def cli() -> click.Group:
    """The `slmflow` group with both commands (adding them again once it registers them is harmless)."""
    from slmflow.cli import main

    main.add_command(serve)
    main.add_command(chat)
    return main


def test_serve_runs_uvicorn_on_loopback_for_a_registered_alias(registered_model_uri: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-c", MAIN, "serve", registered_model_uri, "--port", str(port), "--max-batch-size", "2"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: healthy(url) or process.poll() is not None, timeout=180), log.read_text()
        assert process.poll() is None, log.read_text()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["server-tiny"]
        assert client.chat.completions.create(model="server-tiny", messages=SPAIN).choices[0].message.content == MADRID
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    output = log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output
    assert "POST /v1/chat/completions 200 tokens=" in output


def test_chat_answers_one_message(onnx_model_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["chat", str(onnx_model_path), "--message", SPAIN[0]["content"]])
    assert result.exit_code == 0, result.output
    assert result.stdout == MADRID + "\n"


def test_chat_answers_with_a_transformers_route_model(packaged: dict[str, dict]) -> None:
    # Its answers arrive whole rather than streamed; chat used to expect a stream and crashed.
    uri = packaged["transformers-chat"]["model_uri"]
    result = CliRunner().invoke(cli(), ["chat", uri, "--message", SPAIN[0]["content"], "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The capital of Spain is Madrid"), result.stdout


def test_chat_keeps_a_conversation_until_end_of_input(onnx_model_path: Path) -> None:
    turns = "What is the capital of Spain?\n\nWhat is the capital of Spain?\n"
    result = CliRunner().invoke(cli(), ["chat", str(onnx_model_path), "--max-tokens", "12"], input=turns)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("> ") == 4  # two answered turns, one blank line skipped, then end of input
    assert result.stdout.split("\n")[0] == "> " + MADRID


@pytest.mark.parametrize(
    ("args", "env", "hint"),
    [
        (["--port", "70000"], {}, "--port"),
        ([], {"SLMFLOW_MAX_QUEUE": "0"}, "SLMFLOW_MAX_QUEUE"),
        (["--request-timeout", "-1"], {}, "--request-timeout"),
        (["--api-key", ""], {}, "--api-key"),
    ],
)
def test_bad_settings_are_a_usage_error_before_loading(args: list[str], env: dict[str, str], hint: str) -> None:
    result = CliRunner().invoke(cli(), ["serve", "models:/never-loaded@x", *args], env=env)
    assert result.exit_code == 2
    assert hint in result.output and "Traceback" not in result.output


def test_an_unknown_model_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["chat", str(tmp_path / "missing"), "--message", "hi"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "Traceback" not in result.output


def test_importing_the_server_and_cli_does_no_work() -> None:
    code = (
        "import sys, slmflow.server, slmflow.cli.serve; "
        "print(sorted(m for m in ('mlflow', 'onnxruntime_genai', 'torch', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_settings_default_to_loopback_and_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from slmflow.server import ServerSettings

    assert ServerSettings().host == "127.0.0.1"
    monkeypatch.setenv("SLMFLOW_API_KEY", "k")
    monkeypatch.setenv("SLMFLOW_MAX_BATCH_SIZE", "3")
    settings = ServerSettings(max_batch_size=5)
    assert settings.api_key.get_secret_value() == "k" and settings.max_batch_size == 5
    monkeypatch.setenv("SLMFLOW_API_KEY", "")  # empty means unset, not a key of ""
    assert ServerSettings().api_key is None
