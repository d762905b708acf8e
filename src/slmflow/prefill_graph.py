"""A second decoder graph for reading prompts on CPU: int8 activations x int8 weights.

Why: ONNX Runtime's MatMulNBits (the builder's int4/int8 weights, accuracy level 4) reads a
512-token prompt of SmolLM2-135M no faster than float32 weights do (about 690 tokens/s each, same
run, 2 cores). MatMulInteger (uint8 x int8, VNNI) is about 1.6x faster there. One int8 scale per token
for the activations cost +3.4% perplexity, though: a few input channels of each matrix carry values
far above the rest. So each input channel is divided by a smoothing factor and the matrix's row for
it multiplied by the same (SmoothQuant, Xiao et al. 2023: the product is unchanged, the activations'
outliers move into the weights, which take them better). The factor is peak(x)^alpha /
peak(w)^(1 - alpha) per channel, alpha chosen per input (from ALPHAS) for the smallest error of the
quantized product on a sample of the calibration text's activations. Weights get one int8 scale per
output channel, from the builder's own (dequantized) weights.

Decoding stays on the decoder graph (decode_graph.py smooths it in default int8 builds): at one
token per row, the extra quantizing ops cost more than they save (66 vs 127 tokens/s for one
stream); only decode steps of several rows run here (generation/decoder.py,
prefill_graph_decode_rows).
The LM head stays a MatMulNBits: reading a prompt needs only its last position's logits. Measured
quality and speed: docs/packaging.md.

The graph is written beside the builder's as prefill.onnx (+ prefill.onnx.data, only the new
matrices: the rest still reads model.onnx.data). The direct decoder (generation/decoder.py) reads
prompts with it when it is there.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError
from slmflow.generation.decoder import PREFILL_FILE, UnsupportedGraph, layout_of
from slmflow.progress import Progress

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7)  # smoothing strengths tried per input (SmoothQuant used 0.4-0.75)
SAMPLE_ROWS = 256  # calibration tokens whose activations choose each input's strength
CALIBRATION_CHUNK = 512  # tokens per calibration run
DATA_FILE = PREFILL_FILE + ".data"


class PrefillGraphError(SlmflowError):
    """This model folder cannot get a prefill graph."""


def add_prefill_graph(
    folder: Path,
    weights_from: Path | None = None,
    factors: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write `folder`/prefill.onnx from the folder's decoder graph; its path. The weights (linears
    and LM head) come from `weights_from` where given: another build of the same checkpoint with
    finer weights (an int8 block-32 build for an int4 or block-128 one: requantized, coarser weights
    cost more perplexity). `factors`: what smoothing_factors(folder, weights_from) returns, where
    the caller has it already. Nothing is left behind on failure."""
    import onnx

    _, model_file, model = read_build(folder)
    linears = linears_of(model.graph)
    if not linears:
        raise PrefillGraphError("no prefill graph: the model has no int4/int8 (MatMulNBits) weights")
    if factors is None:
        factors = smoothing_factors(folder, weights_from, progress)
    _rewrite(model.graph, folder, linears, _weight_source(model.graph, folder, weights_from), factors, progress)
    if weights_from is not None:
        _take_lm_head(model.graph, read_build(weights_from)[2].graph, weights_from)
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


def read_build(folder: Path) -> tuple[Any, Path, Any]:
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


def linears_of(graph: Any) -> list[Any]:
    """The MatMulNBits nodes to rewrite: every one but the LM head."""
    return [node for node in graph.node if node.op_type == "MatMulNBits" and "logits" not in node.output]


def _initializers(graph: Any, folder: Path) -> Callable[[str], Any]:
    """A loader of `graph`'s initializers (in `folder`) by name, as arrays."""
    from onnx import numpy_helper

    by_name = {tensor.name: tensor for tensor in graph.initializer}
    return lambda name: numpy_helper.to_array(by_name[name], base_dir=str(folder))


def linear_weights(graph: Any, folder: Path) -> Callable[[Any], Any]:
    """The float32 weights [K, N] of a MatMulNBits node of `graph` (in `folder`)."""
    load = _initializers(graph, folder)
    return lambda node: dequantize(node, load)


def _weight_source(graph: Any, folder: Path, weights_from: Path | None) -> Callable[[Any], Any]:
    """The float32 weights of `graph`'s linears: its own (in `folder`), or those of the build in
    `weights_from`."""
    if weights_from is None:
        return linear_weights(graph, folder)
    return _weights_of_build(read_build(weights_from)[2].graph, weights_from)


def by_input(linears: list[Any]) -> dict[str, list[Any]]:
    """The linears grouped by the input they read (the gate and up projections share one), in
    graph order."""
    readers: dict[str, list[Any]] = {}
    for node in linears:
        readers.setdefault(node.input[0], []).append(node)
    return readers


# Norms whose weight (input index) scales their output: smoothing factors fold into it.
NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


@dataclass(frozen=True)
class Folds:
    """Where an input's smoothing division goes instead of a Mul node before its linears: into the
    weight of the norm that makes it (attention and MLP inputs), or into the output columns of the
    linear whose output is multiplied into it (the MLP's up projection, for the down projection's
    input). Both are exact: x / s is the norm's output with weight / s, and act(gate) * (up / s).
    A Mul node per input cost a small model's decode step more than its arithmetic (node overhead)."""

    norms: dict[str, Any]  # by input: the norm node making it
    columns: dict[str, str]  # by linear node name: the input whose factors divide its output columns

    def divide(self, x: str, name: str, factors: dict[str, Any]) -> tuple[str, list[Any], list[Any]]:
        """`x` divided by its factors: `x` itself where folded; else the output of a Mul named after
        `name` (x's first reader), with that Mul and its inverse factors, to add to the graph."""
        import numpy as np
        from onnx import helper, numpy_helper

        if x in self.norms or x in self.columns.values():
            return x, [], []
        inverse = numpy_helper.from_array((1 / factors[x]).astype(np.float32), f"{name}/inverse_factors")
        divided = f"{name}/smoothed_input"
        return divided, [helper.make_node("Mul", [x, inverse.name], [divided])], [inverse]

    def weights(self, node: Any, x: str, weight_of: Callable[[Any], Any], factors: dict[str, Any]) -> Any:
        """`node`'s float weights [K, N] for its input `x` divided by its factors: rows multiplied by
        them, and output columns divided by what is folded into them."""
        columns = factors[self.columns[node.name]] if node.name in self.columns else 1
        return weight_of(node) * factors[x][:, None] / columns


def folds(graph: Any, linears: list[Any]) -> Folds:
    """The inputs of `linears` whose smoothing can be folded, and where: only where nothing but
    those linears reads the input, and nothing but the fold reads what is changed."""
    made_by = {output: node for node in graph.node for output in node.output if output}
    reads = Counter(name for node in graph.node for name in node.input if name)
    reads.update(output.name for output in graph.output)
    weights = {tensor.name for tensor in graph.initializer}
    linear_making = {node.output[0]: node for node in linears}
    norms: dict[str, Any] = {}
    columns: dict[str, str] = {}
    for x, group in by_input(linears).items():
        maker = made_by.get(x)
        if maker is None or reads[x] != len(group):
            continue
        if maker.op_type in NORMS and maker.output[0] == x:
            weight = maker.input[NORMS[maker.op_type]]
            if weight in weights and reads[weight] == 1:
                norms[x] = maker
        elif maker.op_type == "Mul":
            linear = next((linear_making[i] for i in maker.input if i in linear_making and reads[i] == 1), None)
            if linear is not None:
                columns[linear.name] = x
    return Folds(norms, columns)


def fold_into_norms(graph: Any, folded: Folds, factors: dict[str, Any], folder: Path) -> tuple[list[Any], set[str]]:
    """Divide the weight of each norm in `folded` by its input's factors: the new weights, and the
    names of the ones they replace. The nodes are rewired in place."""
    from onnx import numpy_helper

    load = _initializers(graph, folder)
    added, dropped = [], set()
    for x, norm in folded.norms.items():
        index = NORMS[norm.op_type]
        weight = load(norm.input[index])
        dropped.add(norm.input[index])
        norm.input[index] = f"{norm.name}/smoothed_weight"
        added.append(numpy_helper.from_array((weight / factors[x]).astype(weight.dtype), norm.input[index]))
    return added, dropped


def smoothing_factors(
    folder: Path, weights_from: Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Each linear input's smoothing factors [K], by input name: calibrated on `folder`'s graph, for
    its own weights or `weights_from`'s (add_prefill_graph). Computed once for both graphs of a
    default int8 build (decode_graph.py smooths with the same)."""
    layout, _, model = read_build(folder)
    linears = linears_of(model.graph)
    activations = calibrate(model, folder, layout, linears)
    weight_of = _weight_source(model.graph, folder, weights_from)
    groups = by_input(linears)
    factors = {}
    for x, group in groups.items():
        factors[x] = smoothed(activations[x], [weight_of(node) for node in group])
        if progress:
            progress("choosing smoothing factors", len(factors), len(groups))
    return factors


def _weights_of_build(graph: Any, folder: Path) -> Callable[[Any], Any]:
    """The float32 weights of each linear, from the node of the same name in another build's
    `graph` (in `folder`)."""
    nodes = {_unquantized_name(node): node for node in linears_of(graph)}
    load = linear_weights(graph, folder)

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


def dequantize(node: Any, load: Callable[[str], Any]) -> Any:
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


def calibrate(model: Any, folder: Path, layout: Any, linears: list[Any]) -> dict[str, Activations]:
    """Each linear input's activations over the calibration text: peak per channel, and a sample of
    about SAMPLE_ROWS tokens' rows (float16: a 3.8B model's would take 0.6 GB in float32)."""
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
    every = max(1, len(ids) // SAMPLE_ROWS)
    empty = np.zeros((1, layout.kv_heads, 0, layout.head_size), np.float32)
    peaks: dict[str, list[Any]] = {name: [] for name in inputs}
    samples: dict[str, list[Any]] = {name: [] for name in inputs}
    for start in range(0, len(ids), CALIBRATION_CHUNK):
        chunk = np.asarray([ids[start : start + CALIBRATION_CHUNK]], dtype=np.int64)
        feeds = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        for layer in range(layout.layers):
            feeds[layout.key_name % layer] = feeds[layout.value_name % layer] = empty
        for name, value in zip(inputs, session.run(inputs, feeds), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            peaks[name].append(np.abs(rows).max(axis=0))
            samples[name].append(rows[(-start) % every :: every].astype(np.float16))
    return {name: Activations(np.max(peaks[name], axis=0), np.concatenate(samples[name])) for name in inputs}


@dataclass(frozen=True)
class Activations:
    """What calibration saw at one linear input."""

    peak: Any  # largest magnitude per channel [K]
    sample: Any  # some tokens' rows [rows, K], float16


def _rewrite(
    graph: Any,
    folder: Path,
    linears: list[Any],
    weight_of: Callable[[Any], Any],
    factors: dict[str, Any],
    progress: Progress | None,
) -> None:
    """Replace each linear with its input divided by the smoothing factors (folded where it can
    be: Folds) and quantized per token (uint8, zero point 128), through MatMulIntegerToFloat with
    its smoothed weights (int8, one scale per output channel). Matrices reading the same input (the
    gate and up projections) share the factors and the quantized input. One input's matrices in
    float32 at a time: a 3.8B model's all would take 15 GB at once."""
    import numpy as np
    from onnx import helper, numpy_helper

    folded = folds(graph, linears)
    added, dropped = fold_into_norms(graph, folded, factors, folder)
    added += [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "prefill/inv127"),
        numpy_helper.from_array(np.array(1, np.float32), "prefill/one"),
        numpy_helper.from_array(np.array(128, np.uint8), "prefill/zero"),
        numpy_helper.from_array(np.array([128], np.uint8), "prefill/zero_1d"),
        numpy_helper.from_array(np.array([-1], np.int64), "prefill/last_axis"),
    ]
    readers = by_input(linears)
    replaced = {id(node) for node in linears}
    shared: dict[str, tuple[str, str]] = {}  # by input: its quantized values and scales
    quantized: dict[str, tuple[Any, Any]] = {}  # by node name: its int8 weights and scales
    nodes: list[Any] = []
    done = 0
    for node in graph.node:
        if id(node) not in replaced:
            nodes.append(node)
            continue
        x, name = node.input[0], node.name
        if x not in shared:  # its first reader: smooth and quantize all its readers' weights
            quantized.update(
                {reader.name: per_column(folded.weights(reader, x, weight_of, factors)) for reader in readers[x]}
            )
            smooth, divide, inverse = folded.divide(x, name, factors)
            nodes += divide
            added += inverse
            nodes += _quantize_input(helper, smooth, name, len(factors[x]), first=not shared)
            shared[x] = (f"{name}/x_q", f"{name}/x_scale")
        x_q, x_scale = shared[x]
        int8, scales = quantized.pop(name)
        added += [
            numpy_helper.from_array(int8, f"{name}/int8"),
            numpy_helper.from_array(scales, f"{name}/scales"),
        ]
        # (x_q - 128) @ int8 x per-channel scales, in float: one contrib op instead of MatMulInteger,
        # Cast and Mul (measured +12-18% on a 512-token prompt).
        integer = [x_q, f"{name}/int8", "prefill/one", f"{name}/scales", "prefill/zero"]
        nodes += [
            helper.make_node("MatMulIntegerToFloat", integer, [f"{name}/rows"], domain="com.microsoft"),
            helper.make_node("Mul", [f"{name}/rows", x_scale], [node.output[0]]),
        ]
        done += 1
        if progress:
            progress("building the prefill graph", done, len(linears))
    # The builder's packed weights go last (the loader read them from the graph until now).
    dropped |= {name for node in linears for name in node.input[1:] if name}
    kept = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    del graph.node[:]
    graph.node.extend(nodes)


def smoothed(seen: Activations, weights: list[Any]) -> Any:
    """Smoothing factors [K] for one input read by `weights` (each [K, N]): of the strengths in
    ALPHAS, the one whose quantized products (input per row, smoothed weights per column) are closest
    to the float ones on the calibration sample (relative squared error, summed)."""
    import numpy as np

    x = seen.sample.astype(np.float32)
    exact = [x @ w for w in weights]
    weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best: tuple[float, Any] | None = None
    for alpha in ALPHAS:
        factors = np.clip(
            np.maximum(seen.peak, 1e-5) ** alpha / np.maximum(weight_peak, 1e-5) ** (1 - alpha), 1e-3, 1e3
        )
        factors = factors.astype(np.float32)
        x_q = per_row(x / factors)
        quantized = [per_column(w * factors[:, None]) for w in weights]
        error = sum(
            float(np.square(x_q @ (q * scales) - y).sum() / max(np.square(y).sum(), 1e-30))
            for (q, scales), y in zip(quantized, exact, strict=True)
        )
        if best is None or error < best[0]:
            best = (error, factors)
    assert best is not None
    return best[1]


def per_row(x: Any) -> Any:
    """x quantized to int8 with one scale per row, as float32 (what MatMulIntegerToFloat sees)."""
    import numpy as np

    scales = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127
    return np.clip(np.round(x / scales), -127, 127) * scales


def per_column(w: Any) -> tuple[Any, Any]:
    """w [K, N] as int8 with one float32 scale per column."""
    import numpy as np

    scales = (np.maximum(np.abs(w).max(axis=0), 1e-8) / 127).astype(np.float32)
    return np.clip(np.round(w / scales), -127, 127).astype(np.int8), scales


def _quantize_input(helper: Any, x: str, name: str, channels: int, first: bool) -> list[Any]:
    """x (smoothed) as uint8 (zero point 128) with one scale per token: QuantizeLinear in blocks of
    a whole row. Its zero points must be shaped like its scales, [batch, tokens, 1] for every input:
    made once, by the `first` input's nodes. A row of zeros gets the scale 0 and some values from
    0 / 0, which its product's multiplication by that scale turns back into zeros: no epsilon op."""
    p = name
    zero = [
        helper.make_node("Shape", [f"{p}/x_scale"], ["prefill/x_scale_shape"]),
        helper.make_node("Expand", ["prefill/zero_1d", "prefill/x_scale_shape"], ["prefill/x_zero"]),
    ]
    return [
        helper.make_node("Abs", [x], [f"{p}/x_abs"]),
        helper.make_node("ReduceMax", [f"{p}/x_abs", "prefill/last_axis"], [f"{p}/x_peak"], keepdims=1),
        helper.make_node("Mul", [f"{p}/x_peak", "prefill/inv127"], [f"{p}/x_scale"]),
        *(zero if first else []),
        helper.make_node(
            "QuantizeLinear",
            [x, f"{p}/x_scale", "prefill/x_zero"],
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
