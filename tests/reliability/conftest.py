"""Reliability tests: servers and models built to be broken, and the figures each test measured.

Every test records what it measured with `record(...)`; the figures of the run are printed at the end
of the session and written as JSON (to `$SLMFLOW_RELIABILITY_FIGURES`, else the session's temp
folder), which is where docs/reliability.md takes its numbers from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from slmflow.generation.params import SamplingParams
from slmflow.server import ServerSettings
from tests.server.conftest import LiveServer, onnx_model_path, serve, server, wait_until  # noqa: F401 (fixtures)

FIGURES: dict[str, dict[str, Any]] = {}
_figures_lock = threading.Lock()
CAP = 4  # tokens: the most a fuzzed request generates (see capped_generation)


def record(section: str, **values: Any) -> None:
    """Keep figures of this run (printed and written at the end of the session)."""
    with _figures_lock:
        FIGURES.setdefault(section, {}).update(values)


_FIGURES_FILE: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this run's figures go: `$SLMFLOW_RELIABILITY_FIGURES`, else the session's temp folder."""
    explicit = os.environ.get("SLMFLOW_RELIABILITY_FIGURES")
    path = Path(explicit) if explicit else tmp_path_factory.getbasetemp() / "reliability-figures.json"
    _FIGURES_FILE[:] = [path]
    return path


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not FIGURES or not _FIGURES_FILE:
        return
    path = _FIGURES_FILE[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
    terminalreporter.section("reliability figures")
    for section, values in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    terminalreporter.write_line(f"written to {path}")


def capped_generation(live: LiveServer, cap: int = CAP) -> None:
    """Make every generation of `live`'s engine at most `cap` tokens, whatever the request asks.

    Fuzzed requests ask for up to the whole context; at `cap` tokens 1,000 of them take about a
    minute. Only lengths the engine would accept are capped: an over-long max_tokens or a min_tokens
    over max_tokens still reaches the engine unchanged and is still refused there.
    """
    engine = live.state.backend.engine
    submit_all = engine.submit_all

    def capped(p: SamplingParams | None) -> SamplingParams:
        p = p or SamplingParams()
        refused = p.max_tokens is not None and (p.max_tokens > engine.context_length or p.min_tokens > p.max_tokens)
        if refused:
            return p
        limit = min(p.max_tokens or cap, cap)
        return replace(p, max_tokens=limit, min_tokens=min(p.min_tokens, limit))

    def capped_submit_all(generations: Any) -> Any:
        return submit_all([(prompt, capped(params)) for prompt, params in generations])

    engine.submit_all = capped_submit_all  # engine.submit goes through it too


@pytest.fixture(scope="session")
def short_model_path(onnx_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an `onnx_genai` model that answers in at most CAP tokens by default."""
    from slmflow import onnx_genai

    path = tmp_path_factory.mktemp("reliability-models") / "tiny-short"
    onnx_genai.save_model(onnx_int4, path, task="chat", generation_defaults={"max_tokens": CAP})
    return path


@pytest.fixture(scope="module")
def fuzz_server(short_model_path: Path) -> Iterator[LiveServer]:
    """Default limits, generations capped at CAP tokens, warnings-only logs (1,000 requests are noisy)."""
    for live in serve(ServerSettings(model_uri=str(short_model_path), model_name="tiny", log_level="warning")):
        capped_generation(live)
        yield live


@dataclass
class ServeProcess:
    """`slmflow serve` in a process of its own: its memory and its sockets are its own."""

    process: subprocess.Popen
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def listening(pid: int) -> list[tuple[str, int]]:
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]


def serve_process(model_uri: str, log: Path, *flags: str) -> Iterator[ServeProcess]:
    """Run `slmflow serve MODEL_URI --port 0 FLAGS` until the generator closes; no --host: its default."""
    command = [str(Path(sys.executable).parent / "slmflow"), "serve", model_uri, "--port", "0", *flags]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        assert wait_until(lambda: listening(process.pid) or process.poll() is not None, timeout=180)
        assert process.poll() is None, log.read_text()[-3000:]
        [(host, port)] = listening(process.pid)
        yield ServeProcess(process, host, port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def serve_subprocess(short_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`slmflow serve` with default host, 8 per batch and 16 queue places (32 load clients meet 429s)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    yield from serve_process(
        str(short_model_path), log, "--max-batch-size", "8", "--max-queue", "16", "--log-level", "warning"
    )


class AuditWatch:
    """Python audit events (PEP 578) of this process, recorded while a `watch()` block runs.

    The in-process servers run in this process, so every file the server opens, every directory it
    lists and every class a pickle names passes through here. A hook cannot be removed: one is
    installed, and it records only inside `watch()`.
    """

    EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "shutil.copyfile",
              "shutil.rmtree", "pickle.find_class", "marshal.loads", "subprocess.Popen", "os.system")  # fmt: skip

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event in self.EVENTS:
            with self._lock:
                self.events.append((event, args))

    def watch(self) -> _Watching:
        return _Watching(self)

    def matching(self, needle: str) -> list[tuple[str, tuple[Any, ...]]]:
        return [(event, args) for event, args in self.events if any(needle in str(arg) for arg in args)]


class _Watching:
    def __init__(self, audit: AuditWatch) -> None:
        self.audit = audit

    def __enter__(self) -> AuditWatch:
        self.audit.events.clear()
        self.audit.active = True
        return self.audit

    def __exit__(self, *exc_info: object) -> None:
        self.audit.active = False


_AUDIT: AuditWatch | None = None


@pytest.fixture(scope="session")
def audit() -> AuditWatch:
    global _AUDIT
    if _AUDIT is None:
        _AUDIT = AuditWatch()
    return _AUDIT
