"""A second decoder graph for reading prompts on CPU: int8 activations x int8 weights.

Why: ONNX Runtime's MatMulNBits (the builder's int4/int8 weights, accuracy level 4) reads a
512-token prompt of SmolLM2-135M no faster than float32 weights do (about 690 tokens/s each, same
run, 2 cores). MatMulInteger (uint8 x int8, VNNI) is about 1.6x faster there. One int8 scale per token
for the activations cost +3.4% perplexity, though: a few input channels of each matrix carry values
far above the rest. So those channels (OUTLIER_CHANNELS per matrix, the largest on a calibration
text) stay float32 in a small MatMul beside the integer one, and the rest get one scale per token.
Weights get one int8 scale per output channel, from the builder's own (dequantized) weights.

Decoding stays on the builder's graph: at one token per row, the extra quantizing ops cost more than
they save (66 vs 127 tokens/s for one stream). The LM head stays a MatMulNBits: reading a prompt
needs only its last position's logits. Measured quality and speed: docs/packaging.md.

The graph is written beside the builder's as prefill.onnx (+ prefill.onnx.data, only the new
matrices: the rest still reads model.onnx.data). The direct decoder (generation/decoder.py) reads
prompts with it when it is there.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError
from slmflow.generation.decoder import PREFILL_FILE, UnsupportedGraph, layout_of
from slmflow.progress import Progress

OUTLIER_CHANNELS = 16  # input channels per matrix kept in float32
CALIBRATION_CHUNK = 512  # tokens per calibration run
DATA_FILE = PREFILL_FILE + ".data"


class PrefillGraphError(SlmflowError):
    """This model folder cannot get a prefill graph."""


def add_prefill_graph(
    folder: Path,
    weights_from: Path | None = None,
    outliers: int = OUTLIER_CHANNELS,
    progress: Progress | None = None,
) -> Path:
    """Write `folder`/prefill.onnx from the folder's decoder graph; its path. The weights (linears
    and LM head) come from `weights_from` where given: another build of the same checkpoint with
    finer weights (an int8 block-32 build for an int4 or block-128 one: requantized, coarser weights
    cost more perplexity). Nothing is left behind on failure."""
    import onnx

    layout, model_file, model = _build(folder)
    linears = _linears(model.graph)
    if not linears:
        raise PrefillGraphError("no prefill graph: the model has no int4/int8 (MatMulNBits) weights")
    if weights_from is None:
        finer, weight_of = None, _weights(model.graph, folder)
    else:
        finer = _build(weights_from)[2].graph
        weight_of = _weights_of_build(finer, weights_from)
    peaks = _calibrate(model, folder, layout, linears)
    _rewrite(model.graph, linears, weight_of, peaks, outliers, progress)
    if weights_from is not None:
        _take_lm_head(model.graph, finer, weights_from)
    target, data = folder / PREFILL_FILE, folder / DATA_FILE
    with _written_or_removed(target, data):
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
        mode = model_file.with_name(model_file.name + ".data")
        for path in (target, data):  # onnx writes its data file owner-only; match the builder's files
            path.chmod((mode if mode.exists() else model_file).stat().st_mode & 0o777)
    return target


def _build(folder: Path) -> tuple[Any, Path, Any]:
    """A build's layout, graph file and graph (without its weights)."""
    import onnx

    try:
        layout, model_file = layout_of(json.loads((folder / "genai_config.json").read_text()), folder)
    except (OSError, ValueError, UnsupportedGraph) as e:
        raise PrefillGraphError(f"no prefill graph for the model in {folder} ({e})") from None
    return layout, model_file, onnx.load(str(model_file), load_external_data=False)


def _lm_head(graph: Any) -> Any:
    [head] = [node for node in graph.node if "logits" in node.output]
    return head


def _linears(graph: Any) -> list[Any]:
    """The MatMulNBits nodes to rewrite: every one but the LM head."""
    return [node for node in graph.node if node.op_type == "MatMulNBits" and "logits" not in node.output]


def _initializers(graph: Any, folder: Path) -> Callable[[str], Any]:
    """A loader of `graph`'s initializers (in `folder`) by name, as arrays."""
    from onnx import numpy_helper

    by_name = {tensor.name: tensor for tensor in graph.initializer}
    return lambda name: numpy_helper.to_array(by_name[name], base_dir=str(folder))


def _weights(graph: Any, folder: Path) -> Callable[[Any], Any]:
    """The float32 weights [K, N] of a MatMulNBits node of `graph` (in `folder`)."""
    load = _initializers(graph, folder)
    return lambda node: _dequantize(node, load)


def _weights_of_build(graph: Any, folder: Path) -> Callable[[Any], Any]:
    """The float32 weights of each linear, from the node of the same name in another build's
    `graph` (in `folder`)."""
    nodes = {_unquantized_name(node): node for node in _linears(graph)}
    load = _weights(graph, folder)

    def shape(node: Any) -> tuple[int, int]:
        attrs = _attributes(node)
        return attrs["K"], attrs["N"]

    def weight_of(node: Any) -> Any:
        theirs = nodes.get(_unquantized_name(node))
        if theirs is None or shape(theirs) != shape(node):
            raise PrefillGraphError(f"no prefill graph: {folder} has no {node.name} of the same shape")
        return load(theirs)

    return weight_of


def _unquantized_name(node: Any) -> str:
    """A node's name without the builder's bits suffix (MatMul_Q4 in an int4 build, _Q8 in int8)."""
    return re.sub(r"_Q\d+$", "", node.name)


def _take_lm_head(graph: Any, finer: Any, folder: Path) -> None:
    """Give `graph`'s LM head the weights of the `finer` build's (in `folder`): a prompt's last
    logits, and every position's when scoring (a block-128 head cost the prefill graph +0.62%
    perplexity against +0.07%)."""
    from onnx import numpy_helper

    ours, theirs = _lm_head(graph), _lm_head(finer)
    if ours.op_type != "MatMulNBits" or theirs.op_type != "MatMulNBits":
        return  # a float head: nothing finer to take
    load = _initializers(finer, folder)
    old = set(ours.input[1:])
    names = [f"prefill/lm_head/{i}" if name else "" for i, name in enumerate(theirs.input[1:], start=1)]
    taken = [
        numpy_helper.from_array(load(name), new) for name, new in zip(theirs.input[1:], names, strict=True) if name
    ]
    kept = [tensor for tensor in graph.initializer if tensor.name not in old]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *taken])
    del ours.input[1:]
    ours.input.extend(names)
    del ours.attribute[:]
    ours.attribute.extend(theirs.attribute)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _dequantize(node: Any, load: Callable[[str], Any]) -> Any:
    """A MatMulNBits node's weights as float32 [K, N]."""
    import numpy as np

    attrs = _attributes(node)
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if bits not in (4, 8) or any(name for name in node.input[4:]):
        raise PrefillGraphError(f"no prefill graph: {node.name} has {bits}-bit weights or extra inputs")
    blocks = -(-k // block)
    packed = load(node.input[1]).reshape(n, blocks, block * bits // 8)
    quantized = packed if bits == 8 else np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block)
    scales = load(node.input[2]).astype(np.float32).reshape(n, blocks)
    zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)  # MatMulNBits' default zero point
    if len(node.input) > 3 and node.input[3]:
        points = load(node.input[3])
        if points.dtype != np.uint8:
            raise PrefillGraphError(f"no prefill graph: {node.name} has float zero points")
        points = points.reshape(n, -1)
        if bits == 4:
            points = np.stack([points & 0x0F, points >> 4], axis=-1).reshape(n, -1)
        zero = points[:, :blocks].astype(np.float32)
    weights = (quantized.astype(np.float32) - zero[..., None]) * scales[..., None]
    return np.ascontiguousarray(weights.reshape(n, blocks * block)[:, :k].T)


def _calibrate(model: Any, folder: Path, layout: Any, linears: list[Any]) -> dict[str, Any]:
    """Each linear input's largest magnitude per channel, over the calibration text."""
    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og
    from onnx import TensorProto, helper

    probe = type(model)()
    probe.CopyFrom(model)
    inputs = list(dict.fromkeys(node.input[0] for node in linears))
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    text = files("slmflow.data").joinpath("calibration.txt").read_text()
    ids = [int(token) for token in og.Tokenizer(og.Config(str(folder))).encode(text)]
    empty = np.zeros((1, layout.kv_heads, 0, layout.head_size), np.float32)
    peaks: dict[str, Any] = {}
    for start in range(0, len(ids), CALIBRATION_CHUNK):
        chunk = np.asarray([ids[start : start + CALIBRATION_CHUNK]], dtype=np.int64)
        feeds = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        for layer in range(layout.layers):
            feeds[layout.key_name % layer] = feeds[layout.value_name % layer] = empty
        for name, value in zip(inputs, session.run(inputs, feeds), strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return {node.name: peaks[node.input[0]] for node in linears}


def _rewrite(
    graph: Any,
    linears: list[Any],
    weight_of: Callable[[Any], Any],
    peaks: dict[str, Any],
    outliers: int,
    progress: Progress | None,
) -> None:
    """Replace each linear with: its outlier channels through a float32 MatMul, plus the others
    quantized per token (uint8, zero point 128) through MatMulIntegerToFloat. Matrices reading the same
    input with the same outliers (gate and up projections) share one quantized input. One matrix
    in float32 at a time: a 3.8B model's would take 15 GB at once."""
    import numpy as np
    from onnx import helper, numpy_helper

    added = [
        numpy_helper.from_array(np.array(1e-8, np.float32), "prefill/eps"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "prefill/inv127"),
        numpy_helper.from_array(np.array(1, np.float32), "prefill/one"),
        numpy_helper.from_array(np.array(128, np.uint8), "prefill/zero"),
        numpy_helper.from_array(np.array([128], np.uint8), "prefill/zero_1d"),
        numpy_helper.from_array(np.array([-1], np.int64), "prefill/last_axis"),
    ]
    replaced = {id(node) for node in linears}
    shared: dict[tuple[str, bytes], tuple[str, str, str]] = {}
    nodes: list[Any] = []
    done = 0
    for node in graph.node:
        if id(node) not in replaced:
            nodes.append(node)
            continue
        name = node.name
        weight = weight_of(node)
        channels = np.sort(np.argsort(-peaks[name])[:outliers]).astype(np.int64)
        inner = np.ones(weight.shape[0], np.float32)
        inner[channels] = 0
        scales = np.maximum(np.abs(weight * inner[:, None]).max(axis=0), 1e-8) / 127
        quantized = np.clip(np.round(weight * inner[:, None] / scales), -127, 127).astype(np.int8)
        added += [
            numpy_helper.from_array(quantized, f"{name}/int8"),
            numpy_helper.from_array(scales.astype(np.float32), f"{name}/scales"),
            numpy_helper.from_array(np.ascontiguousarray(weight[channels]), f"{name}/outlier_rows"),
        ]
        key = (node.input[0], channels.tobytes())
        if key not in shared:
            added += [
                numpy_helper.from_array(channels, f"{name}/outliers"),
                numpy_helper.from_array(inner, f"{name}/inner"),
            ]
            nodes += _quantize_input(helper, node.input[0], name, weight.shape[0])
            shared[key] = (f"{name}/x_q", f"{name}/x_scale", f"{name}/x_outliers")
        x_q, x_scale, x_outliers = shared[key]
        # (x_q - 128) @ int8 x per-channel scales, in float: one contrib op instead of MatMulInteger,
        # Cast and Mul (measured +12-18% on a 512-token prompt).
        integer = [x_q, f"{name}/int8", "prefill/one", f"{name}/scales", "prefill/zero"]
        nodes += [
            helper.make_node("MatMulIntegerToFloat", integer, [f"{name}/rows"], domain="com.microsoft"),
            helper.make_node("Mul", [f"{name}/rows", x_scale], [f"{name}/inner_out"]),
            helper.make_node("MatMul", [x_outliers, f"{name}/outlier_rows"], [f"{name}/outlier_out"]),
            helper.make_node("Add", [f"{name}/inner_out", f"{name}/outlier_out"], [node.output[0]]),
        ]
        done += 1
        if progress:
            progress("building the prefill graph", done, len(linears))
    # The builder's packed weights go last (the loader read them from the graph until now).
    dropped = {name for node in linears for name in node.input[1:] if name}
    kept = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    del graph.node[:]
    graph.node.extend(nodes)


def _quantize_input(helper: Any, x: str, name: str, channels: int) -> list[Any]:
    """x's outlier channels (float32), and the others as uint8 (zero point 128) with one scale per
    token: QuantizeLinear in blocks of a whole row, its zero points shaped like its scales."""
    p = name
    return [
        helper.make_node("Gather", [x, f"{p}/outliers"], [f"{p}/x_outliers"], axis=-1),
        helper.make_node("Mul", [x, f"{p}/inner"], [f"{p}/x_inner"]),
        helper.make_node("Abs", [f"{p}/x_inner"], [f"{p}/x_abs"]),
        helper.make_node("ReduceMax", [f"{p}/x_abs", "prefill/last_axis"], [f"{p}/x_peak"], keepdims=1),
        helper.make_node("Max", [f"{p}/x_peak", "prefill/eps"], [f"{p}/x_peak_safe"]),
        helper.make_node("Mul", [f"{p}/x_peak_safe", "prefill/inv127"], [f"{p}/x_scale"]),
        helper.make_node("Shape", [f"{p}/x_scale"], [f"{p}/x_scale_shape"]),
        helper.make_node("Expand", ["prefill/zero_1d", f"{p}/x_scale_shape"], [f"{p}/x_zero"]),
        helper.make_node(
            "QuantizeLinear",
            [f"{p}/x_inner", f"{p}/x_scale", f"{p}/x_zero"],
            [f"{p}/x_q"],
            axis=-1,
            block_size=channels,
        ),
    ]


@contextlib.contextmanager
def _written_or_removed(*paths: Path) -> Iterator[None]:
    """Remove `paths` before the block (the data file is appended to) and, if it fails, after."""
    for path in paths:
        path.unlink(missing_ok=True)
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
