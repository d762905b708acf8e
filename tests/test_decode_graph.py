"""The smoothed decode graph of default int8 CPU builds (decode_graph.py), on the tiny fixture.
Its quality and speed on the real model: tests/test_real_model.py, docs/packaging.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmflow import convert, prefill_graph
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
    return {
        "smoothed": smoothed,
        "builder": convert.convert(tiny_checkpoint, folder / "builder", precision="int8", quantization=as_built),
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
    assert all(made_by[node.input[0]].op_type == "Mul" for node in nodes)  # the input divided by its factors
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


def test_the_engine_answers_as_trained_from_the_smoothed_build(builds: dict[str, Any]) -> None:
    assert_answers_as_trained(builds["smoothed"])
    assert sorted(p.name for p in builds["smoothed"].iterdir() if p.name.startswith(".")) == []
