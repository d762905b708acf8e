"""The decode graph of default int8 CPU builds: the builder's weights smoothed, then requantized at
MatMulNBits block DECODE_BLOCK.

Why: at accuracy level 4, MatMulNBits quantizes the activations to int8 in blocks of its block size
too, so larger blocks are faster (fewer scales) but lose the activations' outlier channels (the
builder's block 128 cost +1.40% perplexity on 8,192 tokens against block 32's +0.59%). Dividing each
input by the prefill graph's smoothing factors (prefill_graph.smoothing_factors: chosen per input on
the calibration text; computed once for both graphs) and multiplying the weights' rows by the same
moves the outliers into the weights, where block 64 costs less than the builder's block 32 did, and
decodes 10-15% faster. The division is folded into the norm or linear making the input where it can
be (prefill_graph.Folds), else one Mul per input does it. Measured figures: docs/packaging.md.

The prefill graph, built before from the builder's block-32 weights, keeps them; what it shares with
the builder's file (embeddings, norms, LM head) is pointed at the rewritten data file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.generation.decoder import PREFILL_FILE
from slmflow.prefill_graph import (
    by_input,
    fold_into_norms,
    folds,
    linear_weights,
    linears_of,
    read_build,
    smoothing_factors,
)
from slmflow.progress import Progress

DECODE_BLOCK = 64
STAGING = ".smoothing"


def smooth_decode_graph(
    folder: Path,
    factors: dict[str, Any] | None = None,
    block_size: int = DECODE_BLOCK,
    progress: Progress | None = None,
) -> None:
    """Rewrite `folder`'s decoder graph (model.onnx and its data file) with weights smoothed by
    `factors` (else smoothing_factors(folder)) at `block_size`; a prefill graph beside it is pointed
    at the new data file."""
    import onnx

    _, model_file, model = read_build(folder)
    if factors is None:
        factors = smoothing_factors(folder, progress=progress)
    linears = linears_of(model.graph)
    _rewrite(model.graph, folder, linears, linear_weights(model.graph, folder), factors, block_size, progress)
    onnx.load_external_data_for_model(model, str(folder))  # what it keeps, before its file is replaced
    data_name = model_file.name + ".data"
    staging = folder / STAGING
    staging.mkdir(exist_ok=True)
    try:
        onnx.save_model(
            model,
            str(staging / model_file.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        for name in (data_name, model_file.name):  # the graph last: it names the data file's offsets
            mode = (folder / name).stat().st_mode & 0o777
            os.replace(staging / name, folder / name)
            (folder / name).chmod(mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (folder / PREFILL_FILE).is_file():
        _relink(folder / PREFILL_FILE, model_file, data_name)


def _rewrite(
    graph: Any,
    folder: Path,
    linears: list[Any],
    weight_of: Callable[[Any], Any],
    factors: dict[str, Any],
    block_size: int,
    progress: Progress | None,
) -> None:
    """Each linear's input divided by its smoothing factors (folded into the norm or linear making
    it where it can be, prefill_graph.Folds; else one Mul per input, shared by the matrices reading
    it), its weights smoothed and requantized at `block_size`."""

    folded = folds(graph, linears)
    added, dropped = fold_into_norms(graph, folded, factors, folder)
    dropped |= {name for node in linears for name in node.input[1:] if name}
    readers = by_input(linears)
    replaced = {id(node) for node in linears}
    smoothed_input: dict[str, str] = {}
    nodes: list[Any] = []
    for node in graph.node:
        x = node.input[0] if id(node) in replaced else None
        if x is not None and x not in smoothed_input:  # its first reader: requantize its readers
            smoothed_input[x], divide, inverse = folded.divide(x, node.name, factors)
            nodes += divide  # before its first reader
            added += inverse
            for reader in readers[x]:
                _requantize(reader, folded.weights(reader, x, weight_of, factors), block_size, added)
            if progress:
                progress("smoothing the decode graph", len(smoothed_input), len(readers))
        if x is not None:
            node.input[0] = smoothed_input[x]
        nodes.append(node)
    kept = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    del graph.node[:]
    graph.node.extend(nodes)


def _requantize(node: Any, weights: Any, block_size: int, added: list[Any]) -> None:
    """Point MatMulNBits `node` at `weights` [K, N] as symmetric int8 in blocks of `block_size`
    (MatMulNBits' layout: [N, blocks, block] uint8 around 128, one float scale per block)."""
    import numpy as np
    from onnx import helper, numpy_helper

    k, n = weights.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weights
    by_block = padded.T.reshape(n, blocks, block_size)
    scales = (np.maximum(np.abs(by_block).max(axis=2), 1e-8) / 127).astype(np.float32)
    quantized = (np.clip(np.round(by_block / scales[..., None]), -127, 127) + 128).astype(np.uint8)
    added += [
        numpy_helper.from_array(quantized, f"{node.name}/smoothed_weights"),
        numpy_helper.from_array(scales, f"{node.name}/smoothed_scales"),
    ]
    del node.input[1:]
    node.input.extend([f"{node.name}/smoothed_weights", f"{node.name}/smoothed_scales"])
    kept = [a for a in node.attribute if a.name not in ("block_size", "bits")]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("block_size", block_size), helper.make_attribute("bits", 8)])


def _relink(prefill_file: Path, model_file: Path, data_name: str) -> None:
    """Point the tensors `prefill_file` reads from the decoder graph's data file at their places in
    the rewritten one (same names; what it no longer holds, the prefill graph never shared)."""
    import onnx

    places = {
        tensor.name: list(tensor.external_data)
        for tensor in onnx.load(str(model_file), load_external_data=False).graph.initializer
    }
    prefill = onnx.load(str(prefill_file), load_external_data=False)
    for tensor in prefill.graph.initializer:
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        if location == data_name:
            del tensor.external_data[:]
            tensor.external_data.extend(places[tensor.name])
    mode = prefill_file.stat().st_mode & 0o777
    staged = prefill_file.with_name(prefill_file.name + ".tmp")
    onnx.save_model(prefill, str(staged))
    os.replace(staged, prefill_file)
    prefill_file.chmod(mode)
