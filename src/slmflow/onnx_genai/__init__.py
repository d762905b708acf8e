"""The `onnx_genai` MLflow flavor: ONNX Runtime GenAI models as MLflow models.

An MLflow model of this flavor holds the ONNX Runtime GenAI folder under `model/` and the code that
serves it under `code/` (this flavor and the generation engine, copied as source: nothing is
pickled). `mlflow.pyfunc.load_model` loads it through `_load_pyfunc`, which any MLflow host can call:
`mlflow models serve`, `mlflow.pyfunc.spark_udf`, or slmflow's own server.

Tasks:
- `chat`: MLflow's `llm/v1/chat` schema (OpenAI chat completions), the model's chat template applied.
- `prompt`: the reference tutorial's schema, `{"prompt": str}` -> the new text only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from slmflow.generation.engine import EngineOptions
from slmflow.onnx_genai.schema import TASKS, default_input_example, signature_for

FLAVOR_NAME = "onnx_genai"
MODEL_DATA_PATH = "model"
_LOADER_MODULE = "slmflow.onnx_genai"
# Scheduler limits a host may override at load time (`mlflow.pyfunc.load_model(uri, model_config=...)`,
# `mlflow models serve`'s model config). Saved with their defaults: MLflow overrides saved keys only.
ENGINE_OPTIONS: dict[str, int | str] = {
    "max_batch_size": EngineOptions.max_batch_size,
    "max_queue": EngineOptions.max_queue,
    "intra_op_threads": 0,
    "scheduler": EngineOptions.scheduler,
    "prefill_chunk": EngineOptions.prefill_chunk,
    "prefill_graph_decode_rows": EngineOptions.prefill_graph_decode_rows,
    "prefix_cache_bytes": EngineOptions.prefix_cache_bytes,
    "kv_cache_bytes": 0,  # 0: the engine's default (a quarter of the machine's memory)
}
# What of slmflow the model needs at load time, copied into the model as code.
_CODE_PARTS = ("__init__.py", "errors.py", "generation", "onnx_genai")

_logger = logging.getLogger(__name__)


def get_default_pip_requirements() -> list[str]:
    """The minimal, pinned requirements of a model of this flavor."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [
        _get_pinned_requirement(module) for module in ("onnxruntime-genai", "onnxruntime", "numpy", "pandas", "jinja2")
    ]


def get_default_conda_env() -> dict[str, Any]:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def save_model(
    onnx_model_dir: str | os.PathLike,
    path: str | os.PathLike,
    task: str = "chat",
    generation_defaults: dict[str, Any] | None = None,
    mlflow_model: Any = None,
    signature: Any = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save the ONNX Runtime GenAI folder `onnx_model_dir` as an MLflow model at `path`.

    The model is written to a staging folder beside `path` and renamed into place: a failure or a
    kill midway leaves nothing at `path`.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.utils.environment import _validate_env_arguments
    from mlflow.utils.model_utils import _validate_and_prepare_target_save_path

    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    source = Path(onnx_model_dir)
    _check_model_folder(source)
    if task not in TASKS:
        raise MlflowException.invalid_parameter_value(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}")
    defaults = _check_defaults(generation_defaults or {})

    path = Path(path).absolute()
    _validate_and_prepare_target_save_path(str(path))
    path.rmdir()  # recreated by the final rename
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        _write_model(
            staging,
            source=source,
            task=task,
            defaults=defaults,
            mlflow_model=mlflow_model if mlflow_model is not None else Model(),
            signature=signature,
            input_example=input_example,
            env=(conda_env, pip_requirements, extra_pip_requirements),
            code_paths=code_paths,
            metadata=metadata,
        )
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_model(
    path: Path,
    *,
    source: Path,
    task: str,
    defaults: dict[str, Any],
    mlflow_model: Any,
    signature: Any,
    input_example: Any,
    env: tuple[Any, Any, Any],
    code_paths: list[str] | None,
    metadata: dict[str, Any] | None,
) -> None:
    import onnxruntime_genai
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.file_utils import get_total_file_size

    shutil.copytree(source, path / MODEL_DATA_PATH)
    code_dir = _copy_code(path, code_paths)
    if input_example is None:
        input_example = default_input_example(task)
    _save_example(mlflow_model, input_example, str(path))
    if signature is not False:
        mlflow_model.signature = signature or signature_for(task)
    if metadata:
        mlflow_model.metadata = metadata
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=_LOADER_MODULE,
        data=MODEL_DATA_PATH,
        code=code_dir,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config={"task": task, **ENGINE_OPTIONS, **defaults},
        streamable=True,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        model_dir=MODEL_DATA_PATH,
        task=task,
        generation_defaults=defaults,
        onnxruntime_genai_version=onnxruntime_genai.__version__,
        code=code_dir,
    )
    if size := get_total_file_size(str(path)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    _write_environment(path, *env)


def log_model(
    onnx_model_dir: str | os.PathLike,
    name: str | None = None,
    task: str = "chat",
    generation_defaults: dict[str, Any] | None = None,
    registered_model_name: str | None = None,
    signature: Any = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    await_registration_for: int = 300,
    **kwargs: Any,
):  # -> mlflow.models.model.ModelInfo
    """Log the ONNX Runtime GenAI folder as an MLflow model of the active run (see `save_model`)."""
    import sys

    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        name=name or "model",
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        onnx_model_dir=onnx_model_dir,
        task=task,
        generation_defaults=generation_defaults,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None, options: Any = None):
    """Load the model's generation engine (`slmflow.generation.GenerationEngine`)."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri
    from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _get_flavor_configuration

    local_path = _download_artifact_from_uri(artifact_uri=str(model_uri), output_path=dst_path)
    conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_path, conf)
    from slmflow.generation.engine import GenerationEngine

    return GenerationEngine(Path(local_path) / conf.get("model_dir", MODEL_DATA_PATH), options)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    """Called by `mlflow.pyfunc.load_model` with the model's `data` folder."""
    from slmflow.generation.engine import EngineOptions, GenerationEngine
    from slmflow.onnx_genai.pyfunc import OnnxGenAIPyfunc

    check_model_folder(path)  # a truncated or missing weight file, named (SlmflowError)
    config = dict(model_config or {})
    task = config.pop("task", "chat")
    options = {key: config.pop(key) for key in ENGINE_OPTIONS if key in config}
    # 0 threads: every core this process may use (the engine's own default).
    options["intra_op_threads"] = options.get("intra_op_threads") or None
    options["kv_cache_bytes"] = options.get("kv_cache_bytes") or None
    pyfunc = OnnxGenAIPyfunc(GenerationEngine(path, EngineOptions(**options)), task=task, defaults=config)
    # The engine's owner thread keeps the engine alive: close it once MLflow drops the model, or
    # every reload (spark_udf loads the model in each task in local mode) keeps one more in memory.
    weakref.finalize(pyfunc, pyfunc.engine.close)
    return pyfunc


def _check_model_folder(source: Path) -> None:
    from mlflow.exceptions import MlflowException

    from slmflow.errors import SlmflowError

    try:
        check_model_folder(source)
    except SlmflowError as e:
        raise MlflowException.invalid_parameter_value(str(e)) from e


def check_model_folder(folder: str | os.PathLike) -> None:
    """Raise SlmflowError unless `folder` is an ONNX Runtime GenAI folder with all its weights.

    Every ONNX file genai_config.json names must be there and parse, and every external weight file
    they reference must exist inside the folder and be long enough for the tensors read from it:
    a missing or truncated `model.onnx.data` is named as such, before anything is logged or loaded.
    """
    from slmflow.errors import SlmflowError

    folder = Path(folder)
    try:
        config = json.loads((folder / "genai_config.json").read_text())
    except FileNotFoundError:
        raise SlmflowError(f"{folder} is not an ONNX Runtime GenAI model folder (no genai_config.json)") from None
    except (OSError, ValueError) as e:
        raise SlmflowError(f"{folder}/genai_config.json cannot be read: {e}") from e
    for name in _onnx_files(config.get("model") if isinstance(config, dict) else None):
        _check_onnx_file(folder, name)


def _onnx_files(node: Any) -> list[str]:
    """Every `filename` in genai_config.json's model section (decoder, embedding, vision, ...)."""
    if isinstance(node, dict):
        found = [node["filename"]] if isinstance(node.get("filename"), str) else []
        return found + [name for value in node.values() for name in _onnx_files(value)]
    if isinstance(node, list):
        return [name for value in node for name in _onnx_files(value)]
    return []


def _check_onnx_file(folder: Path, name: str) -> None:
    from slmflow.errors import SlmflowError

    path = folder / name
    if not path.is_file():
        raise SlmflowError(f"the model in {folder} is incomplete: {name} is missing")
    try:
        import onnx
    except ImportError:  # a serving environment without onnx: ONNX Runtime still refuses a short file
        return
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise SlmflowError(f"the model in {folder} is damaged: {name} does not parse ({e}); truncated?") from e
    needed: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        needed[location] = max(needed.get(location, 0), end)
    root = folder.resolve()
    for location, end in sorted(needed.items()):
        data = (path.parent / location).resolve()
        if not data.is_relative_to(root):
            raise SlmflowError(f"{name} in {folder} reads weights from outside its folder ({location!r})")
        if not data.is_file():
            raise SlmflowError(f"the model in {folder} is incomplete: {location} (weights of {name}) is missing")
        size = data.stat().st_size
        if size < end:
            raise SlmflowError(
                f"the model in {folder} is incomplete: {location} has {size:,} bytes, but {name} reads "
                f"{end:,}; the file is truncated"
            )


def _check_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from slmflow.errors import InvalidRequest
    from slmflow.generation.params import SamplingParams

    try:
        SamplingParams.from_mapping(defaults)
    except InvalidRequest as e:
        raise MlflowException.invalid_parameter_value(f"Invalid generation default: {e}") from e
    return {k: v for k, v in defaults.items() if v is not None}


def _copy_code(path: Path, code_paths: list[str] | None) -> str:
    """Copy the parts of slmflow that serve the model (and the user's code paths) into the model."""
    from mlflow.utils.model_utils import _validate_and_copy_code_paths

    package = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "slmflow"
        bundle.mkdir()
        for part in _CODE_PARTS:
            source = package / part
            if source.is_dir():
                shutil.copytree(source, bundle / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, bundle / part)
        return _validate_and_copy_code_paths([str(bundle), *(code_paths or [])], str(path))


def _write_environment(path: Path, conda_env: Any, pip_requirements: Any, extra_pip_requirements: Any) -> None:
    import yaml
    from mlflow.utils.environment import _process_conda_env, _process_pip_requirements, _PythonEnv
    from mlflow.utils.file_utils import write_to

    if conda_env is None:
        defaults = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_reqs, constraints = _process_pip_requirements(defaults, pip_requirements, extra_pip_requirements)
    else:
        conda_env, pip_reqs, constraints = _process_conda_env(conda_env)
    with (path / "conda.yaml").open("w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(str(path / "constraints.txt"), "\n".join(constraints))
    write_to(str(path / "requirements.txt"), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / "python_env.yaml"))
