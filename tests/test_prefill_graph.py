"""The prefill graph (prefill_graph.py): int8 activations for reading prompts, on the tiny fixture.
Its quality on the real model is checked in tests/test_real_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmflow import convert
from slmflow.errors import SlmflowError
from slmflow.generation.decoder import PREFILL_FILE
from slmflow.prefill_graph import PrefillGraphError, add_prefill_graph
from tests.conftest import assert_answers_as_trained, graph_decoder


def test_prompts_read_by_the_prefill_graph_give_the_builder_graphs_next_tokens(onnx_int4_prefill: Path) -> None:
    from slmflow.generation.engine import GenerationEngine

    engine = GenerationEngine(onnx_int4_prefill)
    try:
        prompt = engine.encode(engine.render_chat([{"role": "user", "content": "What is the capital of Spain?"}]))
    finally:
        engine.close()
    builder, prefill = graph_decoder(onnx_int4_prefill, False), graph_decoder(onnx_int4_prefill, True)
    ours = np.concatenate(list(prefill.logits_in_chunks(prompt, 64)))
    theirs = np.concatenate(list(builder.logits_in_chunks(prompt, 64)))
    assert not np.allclose(ours, theirs, atol=1e-4), "the prefill graph did not read the prompt"
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    np.testing.assert_allclose(prefill.extend(0, 0, prompt), ours[-1], atol=1e-4)


def test_the_engine_answers_as_trained_with_prompts_read_by_the_prefill_graph(onnx_int4_prefill: Path) -> None:
    assert_answers_as_trained(onnx_int4_prefill)


def test_int8_builds_get_a_prefill_graph_by_default_and_others_only_when_asked(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    int8 = convert.convert(tiny_checkpoint, tmp_path / "int8", precision="int8")
    assert (int8 / PREFILL_FILE).is_file() and (int8 / f"{PREFILL_FILE}.data").is_file()
    assert (int8 / PREFILL_FILE).stat().st_mode == (int8 / "model.onnx").stat().st_mode
    without = convert.convert(tiny_checkpoint, tmp_path / "plain", precision="int8", prefill_graph=False)
    assert not (without / PREFILL_FILE).exists()
    assert not convert.uses_prefill_graph("int4", "cpu", None) and convert.uses_prefill_graph("int4", "cpu", True)
    for precision, provider in (("fp32", "cpu"), ("int4", "cuda")):
        with pytest.raises(SlmflowError, match="prefill graph is for int4/int8 CPU builds"):
            convert.uses_prefill_graph(precision, provider, True)


def test_a_model_without_quantized_weights_is_refused_and_left_as_it_was(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fp32 = convert.convert(tiny_checkpoint, tmp_path / "fp32", precision="fp32")
    before = sorted(p.name for p in fp32.iterdir())
    with pytest.raises(PrefillGraphError, match="no int4/int8"):
        add_prefill_graph(fp32)
    assert sorted(p.name for p in fp32.iterdir()) == before


def test_a_build_with_coarser_weights_gets_its_prefill_graph_weights_from_an_int8_build(
    onnx_int4: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    from slmflow.prefill_graph import dequantize

    # Asked for on an int4 build, convert() makes an int8 build beside it to take the weights from,
    # and removes it afterwards.
    built = convert.convert(tiny_checkpoint, tmp_path / "int4", precision="int4", prefill_graph=True)
    assert (built / PREFILL_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["int4"]
    # The builder's int8 as it makes it (the default recipe's decoder graph is smoothed afterwards).
    as_built = convert.Quantization(block_size=32)
    int8 = convert.convert(
        tiny_checkpoint, tmp_path / "int8", precision="int8", quantization=as_built, prefill_graph=False
    )

    def weights(folder: Path, file: str) -> tuple[dict, dict]:
        model = onnx.load(str(folder / file), load_external_data=False)
        arrays = {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in model.graph.initializer}
        return {node.name: node for node in model.graph.node}, arrays

    nodes4, arrays4 = weights(built, "model.onnx")
    nodes8, arrays8 = weights(int8, "model.onnx")
    _, prefill = weights(built, PREFILL_FILE)

    def bits(node) -> int:
        return {a.name: a.i for a in node.attribute}.get("bits", 0)

    name = next(n for n, node in nodes4.items() if node.op_type == "MatMulNBits" and bits(node) == 4)
    # The first 4-bit linear (the recipe keeps layer 0's attention input in int8) is layer 0's
    # attention output projection, the only reader of its input: its smoothing factors are its own,
    # divided by a Mul. Unsmoothed, its weights are the int8 build's within a rounding step.
    assert name.endswith("o_proj/MatMul_Q4")
    step = prefill[f"{name}/scales"] * prefill[f"{name}/inverse_factors"][:, None]
    ours = prefill[f"{name}/int8"].astype(np.float32) * step
    from_int8 = dequantize(nodes8[name.replace("_Q4", "_Q8")], arrays8.__getitem__)
    from_int4 = dequantize(nodes4[name], arrays4.__getitem__)
    assert np.all(np.abs(ours - from_int8) <= step * 0.51)
    assert np.abs(ours - from_int8).mean() * 5 < np.abs(ours - from_int4).mean()


def test_smoothing_moves_the_activations_outliers_into_the_weights() -> None:
    from slmflow.prefill_graph import Activations, per_column, per_row, smoothed

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float16).astype(np.float32)
    x[:, [3, 17]] *= 60  # two channels far above the rest, as in real models' activations
    w = rng.standard_normal((64, 32)).astype(np.float32) * 0.05
    factors = smoothed(Activations(np.abs(x).max(axis=0), x.astype(np.float16)), [w])
    int8, scales = per_column(w * factors[:, None])
    exact = x @ w

    def error(y: np.ndarray) -> float:
        return float(np.square(y - exact).sum() / np.square(exact).sum())

    plain_int8, plain_scales = per_column(w)
    assert error(per_row(x / factors) @ (int8 * scales)) * 5 < error(per_row(x) @ (plain_int8 * plain_scales))
    assert min(factors[3], factors[17]) > 5 * np.median(factors)


def test_a_row_of_zeros_quantizes_to_a_product_of_zeros() -> None:
    """The per-token quantization has no epsilon: a row of zeros gets scale 0 (and values from 0 / 0),
    which the product's multiplication by that scale must turn back into zeros, finite."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmflow.prefill_graph import _quantize_input, per_column

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 8)).astype(np.float32)
    int8, scales = per_column(weights)
    constants = {
        "prefill/inv127": np.array(1 / 127, np.float32),
        "prefill/zero_1d": np.array([128], np.uint8),
        "prefill/last_axis": np.array([-1], np.int64),
        "one": np.array(1, np.float32),
        "zero": np.array(128, np.uint8),
        "w": int8,
        "w_scales": scales,
    }
    nodes = [
        *_quantize_input(helper, "x", "linear", 64, first=True),
        helper.make_node(
            "MatMulIntegerToFloat", ["linear/x_q", "w", "one", "w_scales", "zero"], ["rows"], domain="com.microsoft"
        ),
        helper.make_node("Mul", ["rows", "linear/x_scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "quantized-linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    x[1, 2] = 0
    [y] = session.run(None, {"x": x})
    assert np.all(np.isfinite(y)) and np.all(y[1, 2] == 0)
    exact = x @ weights
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()  # the other rows: quantized products
