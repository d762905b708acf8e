"""The smoothed decode graph of default int8 CPU builds (decode_graph.py), on the tiny fixture.
Its quality and speed on the real model: tests/test_real_model.py, docs/packaging.md."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmflow import convert, decode_graph, prefill_graph
from slmflow.decode_graph import DECODE_BLOCK
from tests.conftest import assert_answers_as_trained, graph_decoder


@pytest.fixture(scope="module")
def builds(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default int8 build, and the builder's int8 as it made it (options given: not smoothed);
    how many times the default build ran the calibration text through its graph."""
    folder = tmp_path_factory.mktemp("decode-graph")
    as_built = convert.Quantization(block_size=32)
    calibrations = []
    real = prefill_graph.calibrate
    with pytest.MonkeyPatch.context() as patch:
        for module in [module for name, module in sys.modules.items() if name.startswith("slmflow.")]:
            if getattr(module, "calibrate", None) is real:  # every module's name for it
                patch.setattr(module, "calibrate", lambda *args: calibrations.append(args) or real(*args))
        smoothed = convert.convert(tiny_checkpoint, folder / "smoothed", precision="int8")
    with pytest.MonkeyPatch.context() as patch:  # every division a Mul node of its own
        for module in (prefill_graph, decode_graph):
            patch.setattr(module, "folds", lambda graph, linears: prefill_graph.Folds({}, {}))
        unfolded = convert.convert(tiny_checkpoint, folder / "unfolded", precision="int8")
    return {
        "smoothed": smoothed,
        "unfolded": unfolded,
        "builder": convert.convert(tiny_checkpoint, folder / "builder", precision="int8", quantization=as_built),
        "fp32": convert.convert(tiny_checkpoint, folder / "fp32", precision="fp32"),
        "calibrations": len(calibrations),
    }


def linears(folder: Path) -> list:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [node for node in graph.node if node.op_type == "MatMulNBits" and "logits" not in node.output], graph


def test_default_int8_builds_decode_with_smoothed_block_64_weights(builds: dict[str, Any]) -> None:
    nodes, graph = linears(builds["smoothed"])
    made_by = {output: node for node in graph.node for output in node.output}
    assert nodes and all({a.name: a.i for a in node.attribute}["block_size"] == DECODE_BLOCK for node in nodes)
    # Each input divided by its factors: in the weights of the norm making it (attention and MLP
    # inputs), in the up projection's columns (the down projection's), else by a Mul (attention output).
    divided_by = Counter(
        "norm" if made_by[node.input[0]].input[-1].endswith("/smoothed_weight")
        else "Mul" if made_by[node.input[0]].input[1].endswith("/inverse_factors")
        else "up columns" if made_by[node.input[0]].op_type == "Mul" and "mlp" in node.name
        else "nothing"
        for node in nodes
    )  # fmt: skip
    layers = len(nodes) // 5  # qkv, o, gate, up, down
    assert divided_by == {"norm": 3 * layers, "Mul": layers, "up columns": layers}, divided_by
    builder_nodes, _ = linears(builds["builder"])
    assert all({a.name: a.i for a in node.attribute}["block_size"] == 32 for node in builder_nodes)
    assert convert.smooths_decode_graph("int8", "cpu", None)
    assert not convert.smooths_decode_graph("int8", "cuda", None) and not convert.smooths_decode_graph(
        "int4", "cpu", None
    )
    # Both graphs smoothed with the same factors, found once.
    assert builds["calibrations"] == 1


def test_the_smoothed_graph_predicts_as_the_builders(builds: dict[str, Any]) -> None:
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(builds["smoothed"])
    try:
        prompt = engine.encode(engine.render_chat([{"role": "user", "content": "What is the capital of Japan?"}]))
    finally:
        engine.close()
    ours = np.concatenate(list(graph_decoder(builds["smoothed"], prefill=False).logits_in_chunks(prompt, 64)))
    theirs = np.concatenate(list(graph_decoder(builds["builder"], prefill=False).logits_in_chunks(prompt, 64)))
    assert not np.allclose(ours, theirs, atol=1e-4), "the decode graph was not rewritten"
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    # The prefill graph was made from the builder's weights before the rewrite, and still reads them
    # (what it shares with the decoder graph's data file was pointed at its new place).
    ours = np.concatenate(list(graph_decoder(builds["smoothed"], prefill=True).logits_in_chunks(prompt, 64)))
    theirs = np.concatenate(list(graph_decoder(builds["builder"], prefill=True).logits_in_chunks(prompt, 64)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("prefill", [False, True], ids=["decoder graph", "prefill graph"])
def test_folding_the_smoothing_into_norms_and_columns_keeps_the_products(builds: dict[str, Any], prefill: bool) -> None:
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(builds["smoothed"])
    try:
        prompt = engine.encode(engine.render_chat([{"role": "user", "content": "What is the capital of Spain?"}]))
    finally:
        engine.close()

    def logits(build: str, prefill: bool) -> np.ndarray:
        return np.concatenate(list(graph_decoder(builds[build], prefill=prefill).logits_in_chunks(prompt, 64)))

    folded, unfolded, exact = logits("smoothed", prefill), logits("unfolded", prefill), logits("fp32", False)
    quantization_error = np.abs(folded - exact).mean()
    # The same products in exact arithmetic: the two differ only where a last-bit difference moved an
    # activation across a rounding step of its int8 quantization (measured: 1% of the quantization
    # error through the prefill graph, 33% through the decoder graph's blocks; a wrong fold: >100%).
    assert np.abs(folded - unfolded).mean() < (0.1 if prefill else 0.5) * quantization_error
    assert np.abs(unfolded - exact).mean() < 2 * quantization_error


def test_the_engine_answers_as_trained_from_the_smoothed_build(builds: dict[str, Any]) -> None:
    assert_answers_as_trained(builds["smoothed"])
    assert sorted(p.name for p in builds["smoothed"].iterdir() if p.name.startswith(".")) == []
