"""One `package` call = one MLflow run: resolve the source, convert, measure what the conversion
cost, log, check it loads, register.

Everything that can be checked is checked before the run starts; a failure inside the run marks it
FAILED, and the model is registered only once it is fully logged and loads back. A conversion over
its quality budget (`max_quality_loss`) fails before the model is even logged.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmflow import convert
from slmflow.checkpoints import Checkpoint, resolve
from slmflow.decode_graph import DECODE_BLOCK
from slmflow.errors import QualityBudgetExceeded, SlmflowError
from slmflow.generation.decoder import PREFILL_FILE
from slmflow.onnx_genai.schema import CHAT_EXAMPLE, TASKS
from slmflow.progress import Progress, reading

if TYPE_CHECKING:
    from slmflow.evaluation.quality import QualityReport

ROUTES = ("onnx", "transformers")
# host:pid:start time of the process running a package run: tells an interrupted run from a live one.
PROCESS_TAG = "slmflow.package.process"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageSpec:
    source: str
    route: str = "onnx"
    precision: str = convert.DEFAULT_PRECISION
    task: str = "chat"
    provider: str = "cpu"
    name: str | None = None  # registered model name
    alias: str | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    quantization: convert.Quantization | None = None  # None: the precision's default recipe
    prefill_graph: bool | None = None  # None: int8 CPU builds (convert.uses_prefill_graph)
    measure_quality: bool = True  # ONNX route: measure the conversion against its source
    max_quality_loss: float | None = None  # percent of perplexity; over it, nothing is registered

    def check(self) -> None:
        if self.route not in ROUTES:
            raise SlmflowError(f"unknown route {self.route!r}; choose one of {', '.join(ROUTES)}")
        if self.task not in TASKS:
            raise SlmflowError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.route == "transformers" and self.task != "chat":
            raise SlmflowError("the transformers route packages the chat task (llm/v1/chat) only")
        if self.route == "onnx":
            convert.check_target(self.precision, self.provider, self.quantization)
            convert.uses_prefill_graph(self.precision, self.provider, self.prefill_graph)
        elif self.quantization is not None or self.prefill_graph:
            raise SlmflowError("quantization options and the prefill graph apply to the ONNX route")
        if self.max_quality_loss is not None:
            if self.route != "onnx" or not self.measure_quality:
                raise SlmflowError("--max-quality-loss needs the ONNX route with its quality measured")
            if self.max_quality_loss < 0:
                raise SlmflowError(f"--max-quality-loss is a percentage >= 0; got {self.max_quality_loss}")
        if self.alias and not self.name:
            raise SlmflowError("--alias needs --name: an alias points at a registered version")


@dataclass(frozen=True)
class PackageResult:
    run_id: str
    model_uri: str
    registered_name: str | None
    version: str | None
    metrics: dict[str, float]
    quality: QualityReport | None = None
    quality_note: str | None = None  # why quality was not measured, when it was not

    def as_json(self) -> dict[str, Any]:
        quality = {k.removeprefix("quality."): v for k, v in self.quality.metrics().items()} if self.quality else None
        return {
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "registered_name": self.registered_name,
            "version": self.version,
            "quality": quality,
        }


def package(spec: PackageSpec, progress: Progress | None = None) -> PackageResult:
    """Package `spec.source` as an MLflow model in a new run, and register it if asked."""
    import mlflow

    from slmflow import registry

    spec.check()
    checkpoint = resolve(spec.source)
    if spec.route == "transformers" and checkpoint.kind == "onnx":
        raise SlmflowError("the transformers route needs a Hugging Face checkpoint, not an ONNX Runtime GenAI folder")
    check_weights(checkpoint, spec.route)  # a missing or truncated weight file is named before any run starts
    with mlflow.start_run(run_name=f"package-{spec.route}", tags={PROCESS_TAG: _this_process()}) as run:
        end_interrupted_runs(run.info.experiment_id, run.info.run_id)
        mlflow.log_params(_params(spec, checkpoint))
        metrics: dict[str, float] = {}
        quality, note = None, None
        with tempfile.TemporaryDirectory(prefix="slmflow-package-") as tmp:
            work = Path(tmp)
            if checkpoint.kind == "gguf":
                checkpoint = _dequantize(checkpoint, metrics, progress)
            if spec.route == "onnx":
                model_uri, quality, note = _log_onnx(spec, checkpoint, work, metrics, progress)
            else:
                model_uri = _log_transformers(spec, checkpoint, metrics, progress)
        metrics["load_seconds"] = _time_load(model_uri, progress)
        mlflow.log_metrics(metrics)
        version = None
        if spec.name:
            _say(progress, f"registering {spec.name}")
            version = registry.register(model_uri, spec.name, spec.alias, tags={"route": spec.route})
        return PackageResult(run.info.run_id, model_uri, spec.name, version, metrics, quality, note)


def _this_process() -> str:
    import os

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _process_alive(tag: str) -> bool:
    """True unless the process `tag` names ran on this host and is gone (or its pid was reused)."""
    import psutil

    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: cannot tell, leave it
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def end_interrupted_runs(experiment_id: str, current_run_id: str) -> list[str]:
    """Mark KILLED, and report, the package runs of this host still RUNNING though their process died.

    A `slmflow package` killed midway (SIGKILL, OOM, power) cannot end its own run; the next one
    says so and ends it. Nothing else changes: such a run never registered a version (registration
    is its last step), and what it logged stays for inspection.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` != ''", max_results=200
    )
    ended = []
    for stale in runs:
        if stale.info.run_id == current_run_id or _process_alive(stale.data.tags.get(PROCESS_TAG, "")):
            continue
        client.set_terminated(stale.info.run_id, status="KILLED")
        # A model cut off mid-upload stays PENDING: mark it FAILED so nobody takes it for a model.
        # (Filtered here, not by `status = 'PENDING'`: on PostgreSQL MLflow compares its integer
        # column with the string and the search fails.)
        logged = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{stale.info.run_id}'")
        pending = [model for model in logged if model.status == LoggedModelStatus.PENDING]
        for model in pending:
            client.finalize_logged_model(model.model_id, "FAILED")
        ended.append(stale.info.run_id)
        log.warning(
            "run %s (%s) was interrupted before it finished: its process is gone; marked KILLED%s, nothing was registered",
            stale.info.run_id,
            stale.info.run_name,
            f" and its unfinished model {', '.join(m.model_id for m in pending)} FAILED" if pending else "",
        )
    return ended


def check_weights(checkpoint: Checkpoint, route: str = "onnx") -> None:
    """Raise SlmflowError naming a missing or truncated weight file of `checkpoint`.

    ONNX Runtime GenAI folders: every ONNX file and external weight file, sized against what the
    graph reads. Hugging Face checkpoints: every safetensors file (or shard the index names), sized
    against the tensors its header lists. GGUF files: every tensor within the file, and an
    architecture the route can package.
    """
    from slmflow.checkpoints import gguf
    from slmflow.onnx_genai import check_model_folder

    if checkpoint.kind == "gguf":
        gguf.check_architecture(gguf.inspect(checkpoint.path), route)
        return
    if checkpoint.kind != "hf":
        check_model_folder(checkpoint.path)
        return
    folder = checkpoint.path
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise SlmflowError(f"the checkpoint in {folder} is damaged: {index.name} cannot be read ({e})") from e
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
        if not files and not any(folder.glob("*.bin")):
            raise SlmflowError(f"the checkpoint in {folder} has no weights: no *.safetensors or *.bin file")
    for name in files:
        _check_safetensors(folder, name)


def _check_safetensors(folder: Path, name: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    path = folder / name
    if not path.is_file():
        raise SlmflowError(f"the checkpoint in {folder} is incomplete: {name} is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size < 8 + header_length:
                raise ValueError("shorter than its header")
            header = json.loads(f.read(header_length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SlmflowError(
            f"the checkpoint in {folder} is damaged: {name} is not a readable safetensors file ({e}); truncated?"
        ) from e
    if size < 8 + header_length + end:
        raise SlmflowError(
            f"the checkpoint in {folder} is incomplete: {name} has {size:,} bytes, its tensors need "
            f"{8 + header_length + end:,}; the file is truncated"
        )


def _params(spec: PackageSpec, checkpoint: Checkpoint) -> dict[str, Any]:
    params: dict[str, Any] = {
        "source": spec.source,
        "source_kind": checkpoint.kind,
        "architecture": checkpoint.architecture,
        "route": spec.route,
        "task": spec.task,
    }
    if spec.route == "onnx":
        converted = checkpoint.kind != "onnx"
        params |= {"precision": spec.precision if converted else "as-is", "execution_provider": spec.provider}
        recipe = convert.recipe_for(spec.precision, spec.quantization) if converted else None
        if recipe is not None:
            params["quantization"] = recipe.describe()
        params["prefill_graph"] = (
            convert.uses_prefill_graph(spec.precision, spec.provider, spec.prefill_graph)
            if converted
            else (checkpoint.path / PREFILL_FILE).is_file()
        )
        if converted and convert.smooths_decode_graph(spec.precision, spec.provider, spec.quantization):
            params["decode_graph"] = f"smoothed int8, block {DECODE_BLOCK}"
        if spec.max_quality_loss is not None:
            params["max_quality_loss_pct"] = spec.max_quality_loss
    params |= {f"generation.{k}": v for k, v in spec.generation_defaults.items()}
    return params


def _dequantize(checkpoint: Checkpoint, metrics: dict[str, float], progress: Progress | None) -> Checkpoint:
    """A GGUF source becomes a float Hugging Face checkpoint, or is found as one under the slmflow
    home (the same file packaged before); the run's `gguf_checkpoint` tag says which."""
    import mlflow

    from slmflow.checkpoints import gguf

    started = time.perf_counter()
    folder, kept = gguf.cached_checkpoint(gguf.inspect(checkpoint.path), progress)
    metrics["gguf_dequantize_seconds"] = time.perf_counter() - started
    mlflow.set_tag("gguf_checkpoint", f"{'reused' if kept else 'dequantized'}: {folder}")
    return Checkpoint(path=folder, kind="hf", source=checkpoint.source)


def _log_onnx(
    spec: PackageSpec, checkpoint: Checkpoint, work: Path, metrics: dict[str, float], progress: Progress | None
) -> tuple[str, QualityReport | None, str | None]:
    """Convert (unless the source is ONNX already), measure the conversion, log: (model URI, the
    quality report, or why there is none)."""
    import mlflow

    from slmflow import onnx_genai

    folder = checkpoint.path
    quality, note = None, None
    if checkpoint.kind == "hf":
        started = time.perf_counter()
        folder = convert.convert(
            checkpoint.path,
            work / "onnx",
            precision=spec.precision,
            provider=spec.provider,
            quantization=spec.quantization,
            prefill_graph=spec.prefill_graph,
            num_layers=_num_layers(checkpoint),
            progress=progress,
        )
        metrics["conversion_seconds"] = time.perf_counter() - started
        if spec.measure_quality:
            quality = _measure_quality(spec, checkpoint.path, folder, metrics, progress)
        else:
            note = "not measured (--no-quality)"
    else:
        note = "not measured: the source is an ONNX model, so there is no checkpoint to compare it with"
    if note:
        mlflow.set_tag("quality", note)
    metrics["model_size_bytes"] = float(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    defaults = {"model_name": spec.name or _source_name(spec.source), **spec.generation_defaults}
    with _uploading(progress, int(metrics["model_size_bytes"]), skip=folder):
        info = onnx_genai.log_model(folder, name="model", task=spec.task, generation_defaults=defaults)
    return info.model_uri, quality, note


def _measure_quality(
    spec: PackageSpec, source: Path, folder: Path, metrics: dict[str, float], progress: Progress | None
) -> QualityReport:
    """Measure the converted model against its source, log it, and hold it to the quality budget."""
    import mlflow

    from slmflow.evaluation import quality

    if spec.provider != "cpu":
        raise SlmflowError("the quality of a CUDA build cannot be measured on the CPU; pass --no-quality")
    started = time.perf_counter()
    report = quality.measure(source, folder, progress)
    metrics["quality_seconds"] = time.perf_counter() - started
    mlflow.log_metrics(report.metrics())
    mlflow.log_dict(report.as_dict(), "quality.json")
    budget = spec.max_quality_loss
    if budget is not None and report.worst_increase_pct > budget:
        recipe = convert.recipe_for(spec.precision, spec.quantization)
        worst = max(report.perplexity, report.perplexity_decode_graph or 0.0)
        raise QualityBudgetExceeded(
            f"{spec.precision} ({recipe.describe() if recipe else 'no quantization'}) raised perplexity by "
            f"{report.worst_increase_pct:.2f}% ({report.perplexity_source:.3f} -> {worst:.3f}), "
            f"over the budget of {budget:g}%; nothing was registered"
        )
    return report


def _source_name(source: str) -> str:
    """A model name from a source: a folder's or a GGUF file's name, without its extension."""
    return Path(source.rstrip("/")).name.removesuffix(".gguf")


def _log_transformers(
    spec: PackageSpec, checkpoint: Checkpoint, metrics: dict[str, float], progress: Progress | None
) -> str:
    import mlflow
    import transformers

    _say(progress, "loading the transformers pipeline")
    pipe = transformers.pipeline("text-generation", model=str(checkpoint.path), device="cpu")
    metrics["model_size_bytes"] = float(
        sum(
            f.stat().st_size for f in checkpoint.path.rglob("*") if f.is_file() and f.suffix in {".safetensors", ".bin"}
        )
    )
    with _uploading(progress, int(metrics["model_size_bytes"]), skip=checkpoint.path):
        info = mlflow.transformers.log_model(
            transformers_model=pipe,
            name="model",
            task="llm/v1/chat",
            model_config=transformers_model_config(spec.generation_defaults),
            input_example=CHAT_EXAMPLE,
            # MLflow's default adds torchvision, which does not install beside the CPU torch build.
            pip_requirements=transformers_requirements(),
        )
    return info.model_uri


def _uploading(progress: Progress | None, size: int, skip: Path) -> AbstractContextManager[None]:
    """Progress of logging the model, in MB: MLflow saves it to a temporary folder, then uploads it
    from there (to the tracking server, or copies it into the local artifact store)."""
    import mlflow

    where = mlflow.get_tracking_uri()
    message = f"uploading the model to {where}" if where.startswith("http") else "logging the model to MLflow"
    return reading(progress, message, size, under=Path(tempfile.gettempdir()), skip=skip)


def transformers_model_config(defaults: dict[str, Any]) -> dict[str, Any]:
    """Pipeline generation settings from our OpenAI-style defaults."""
    config: dict[str, Any] = {"max_new_tokens": int(defaults.get("max_tokens", 256))}
    temperature = defaults.get("temperature")
    if temperature:
        config |= {"do_sample": True, "temperature": float(temperature)}
    elif temperature == 0:
        config["do_sample"] = False
    for key in ("top_p", "top_k"):
        if defaults.get(key) is not None:
            config[key] = defaults[key]
    return config


def transformers_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "jinja2")
    ]


def _time_load(model_uri: str, progress: Progress | None) -> float:
    """Load the logged model back as pyfunc: proves it loads, and measures how long that takes."""
    import mlflow

    from slmflow.generation.engine import GenerationEngine

    _say(progress, "loading the logged model back")
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    seconds = time.perf_counter() - started
    try:
        raw = model.get_raw_model()
    except (AttributeError, NotImplementedError):  # flavors without a raw model to stop
        raw = None
    if isinstance(raw, GenerationEngine):  # stop its owner thread now rather than at exit
        raw.close()
    return seconds


def _num_layers(checkpoint: Checkpoint) -> int | None:
    import json

    config = json.loads((checkpoint.path / "config.json").read_text())
    return config.get("num_hidden_layers")


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message, 0, 0)
