"""The model builder's decoder graph, run directly on ONNX Runtime with a KV cache we own.

ONNX Runtime GenAI 0.18 batches on CPU only by restarting a Generator (its `og.Engine` with dynamic
batching is CUDA-only) and keeps a KV state only inside one Generator. Running the same graph
ourselves gives every request a *slot*: row `slot` of one `[slots, kv_heads, capacity, head_size]`
buffer per layer and per key/value, bound as both past and present (GroupQueryAttention writes the
new tokens in place). Rows at different lengths decode in one batch: each row's past length comes
from its own attention-mask row (GQA's `seqlens_k`), so a request joins or leaves between any two
steps, and a slot can be filled with a kept prefix's KV (prefix reuse) before the rest is read.

GQA reads a prompt that continues a past (sequence > 1 with a past) only at batch size 1, so such
prompts are read one row at a time into their slot; first prompts (no past) are read together into
a scratch buffer and copied into their slots.

The exported graph computes logits for every position it reads, though a prompt needs only its
last: at load, a Gather is put before the LM head, fed by an input of the positions wanted
(`logits_positions`, into the flattened batch x sequence). Measured on SmolLM2-135M int8: the LM
head was 14% of a 512-token prefill, and the logits of 8 prompts of 1,200 tokens would take 1.9 GB.

Where the model folder has a prefill graph (prefill.onnx, see prefill_graph.py), prompts are read by
it and decode steps by the builder's graph, both on the same KV buffers; decode steps of many rows
(`prefill_graph_decode_rows` or more) by the prefill graph too, whose integer products are faster there.

Knows neither MLflow nor HTTP; used by the engine's owner thread only (not thread-safe).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Capacity (tokens per slot) grows in steps of this many tokens, and returns to it when idle.
CAPACITY_STEP = 256
# The graph that reads prompts faster, where a model folder has one (written by prefill_graph.py).
PREFILL_FILE = "prefill.onnx"
# A prompt read alone with no past is read in pieces of about this many tokens (one piece below 1.5
# of them): ONNX Runtime's CPU GroupQueryAttention scores a fresh prompt as a full S x S matrix and
# then zeroes its causal half, while a piece that continues the ones before it scores only its rows
# against the keys so far. The same numbers (each query sees the keys at and before it), less work.
# Measured, SmolLM2-135M int8, 2 threads, alternated rounds, whole vs in pieces: 512 tokens 308 ->
# 279 ms (2 pieces; 4 pieces 296), 384 204 -> 193 ms, 256 122 -> 129 ms (2 pieces: not worth it),
# 1,024 726 -> 673 ms (4 pieces). A prompt that continues a past gains little (512 after 512: 418 ->
# 403 ms; after 1,536: 764 -> 761) and is read whole.
PROMPT_PIECE = 256


@dataclass(frozen=True)
class Layout:
    """The decoder graph's shapes and names, from genai_config.json."""

    layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    hidden_size: int
    key_name: str  # e.g. "past_key_values.%d.key"
    value_name: str
    present_key_name: str
    present_value_name: str

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * 4  # float32 keys and values


class UnsupportedGraph(Exception):
    """This model's graph or provider is not one the direct decoder runs (ONNX Runtime GenAI does)."""


def layout_of(config: dict[str, Any], model_dir: Path) -> tuple[Layout, Path]:
    """The graph layout and file, or UnsupportedGraph (a GPU build, or inputs we do not provide)."""
    decoder = config["model"].get("decoder", {})
    providers = decoder.get("session_options", {}).get("provider_options", [])
    if providers:
        raise UnsupportedGraph(f"execution provider {json.dumps(providers)}")
    inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
    try:
        layout = Layout(
            layers=int(decoder["num_hidden_layers"]),
            kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]),
            vocab_size=int(config["model"]["vocab_size"]),
            hidden_size=int(decoder["hidden_size"]),
            key_name=inputs["past_key_names"],
            value_name=inputs["past_value_names"],
            present_key_name=outputs["present_key_names"],
            present_value_name=outputs["present_value_names"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedGraph(f"genai_config.json lacks {e}") from None
    extra = set(inputs) - {"input_ids", "attention_mask", "past_key_names", "past_value_names"}
    if extra or inputs.get("input_ids") != "input_ids" or inputs.get("attention_mask") != "attention_mask":
        raise UnsupportedGraph(f"decoder inputs {sorted(inputs)}")
    return layout, model_dir / decoder.get("filename", "model.onnx")


class Decoder:
    """One ONNX Runtime session of the decoder graph and the KV slots of the requests it runs."""

    def __init__(
        self,
        model_file: Path,
        layout: Layout,
        slots: int,
        threads: int,
        max_capacity: int,
        prefill_file: Path | None = None,
        prefill_graph_decode_rows: int = 0,
    ) -> None:
        import numpy as np
        import onnxruntime as ort

        self._ort, self._np = ort, np
        self.layout = layout
        self._session, self.selects_positions = self._open(model_file, threads)
        # Prompts are read by the prefill graph where there is one (prefill_graph.py), else by the
        # same graph; both bind the same KV buffers.
        self._prompt_session = self._session
        if prefill_file is not None:
            self._prompt_session, selects = self._open(prefill_file, threads)
            if selects != self.selects_positions:
                raise UnsupportedGraph(f"{prefill_file.name} and {model_file.name} differ in their LM head")
        self._output_names = [output.name for output in self._prompt_session.get_outputs()]  # runs by name
        self.prefill_graph_decode_rows = prefill_graph_decode_rows if prefill_file is not None else 0
        self.slots = slots
        self.max_capacity = max_capacity
        # The buffer grows with slack (fewer copies) only within this many bytes, set by its owner;
        # what a caller asks for is always given (the batcher keeps its asks within them).
        self.max_bytes: int | None = None
        self.rows = self.capacity = 0
        self.peak_bytes = 0  # the largest the buffer has been
        self._keys: list[Any] = []
        self._values: list[Any] = []
        self._resize(1, min(CAPACITY_STEP, max_capacity))

    def _open(self, model_file: Path, threads: int) -> tuple[Any, bool]:
        """A session of `model_file` (with the position selection where the LM head allows it), and
        whether it selects positions."""
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Each session has its own threads, which spin for a while after a run by default: with two
        # sessions taking turns (prompt reads between decode steps) they took the cores from each
        # other. Measured, SmolLM2 int8, 10 x (a 128-token read + a decode step of 8 rows): 1,980 ms
        # spinning vs 1,056 ms stopped; one stream's decode unchanged (113 vs 127 tokens/s, noise).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        graph = _with_position_selection(model_file, self.layout)
        if graph is not None:  # loaded from bytes: its weights are found beside the original file
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(model_file.parent)
            )
        session = self._ort.InferenceSession(graph or str(model_file), options, providers=["CPUExecutionProvider"])
        layout = self.layout
        names = {i.name for i in session.get_inputs()} - {POSITIONS}
        expected = {"input_ids", "attention_mask"} | {
            name % i for i in range(layout.layers) for name in (layout.key_name, layout.value_name)
        }
        if names != expected:
            raise UnsupportedGraph(f"graph inputs {sorted(names - expected) or sorted(expected - names)}")
        return session, graph is not None

    # --- KV slots ------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.rows * self.capacity * self.layout.bytes_per_token

    def bytes_for(self, rows: int, tokens: int) -> int:
        """The smallest buffer with `rows` slots of room for `tokens` tokens."""
        return rows * self._capacity_for(tokens) * self.layout.bytes_per_token

    def ensure(self, slot: int, tokens: int) -> None:
        """Room for slot `slot`, and for `tokens` tokens in every slot (contents kept)."""
        self.reserve(max(slot + 1, self.rows), max(tokens, self.capacity))

    def reserve(self, rows: int, tokens: int) -> None:
        """Room for `rows` slots of `tokens` tokens each, contents kept. The caller says that no slot
        above `rows` holds anything and none holds more than `tokens` tokens: the buffer may shrink
        to that when it has to change. It holds the slots up to the highest one used, each as long as
        the longest row (a lone long conversation costs one slot's worth, not max_batch_size
        slots'), with slack for growth while it stays within max_bytes."""
        if rows <= self.rows and tokens <= self.capacity:
            # Nothing to grow: shrink only to come back within max_bytes (after rows were parked).
            smallest = (rows, self._capacity_for(tokens))
            if self.max_bytes is None or self.nbytes <= self.max_bytes or smallest == (self.rows, self.capacity):
                return
            self._resize(*smallest)
            return
        grown_rows = min(self.slots, max(rows, 2 * self.rows)) if rows > self.rows else rows
        capacity = self.capacity
        if tokens > capacity:
            # By half again at least: a growing conversation would otherwise copy every slot's KV
            # each CAPACITY_STEP tokens.
            capacity = self._capacity_for(max(tokens, capacity * 3 // 2))
        if self.max_bytes is not None and grown_rows * capacity * self.layout.bytes_per_token > self.max_bytes:
            room = self.max_bytes // (rows * self.layout.bytes_per_token) // CAPACITY_STEP * CAPACITY_STEP
            grown_rows, capacity = rows, max(self._capacity_for(tokens), min(capacity, room))
        self._resize(grown_rows, capacity)

    def _capacity_for(self, tokens: int) -> int:
        return min(_steps(tokens), max(self.max_capacity, tokens))

    def shrink(self) -> None:
        """Give back a grown buffer's memory (call when no slot holds anything)."""
        if self.rows > 1 or self.capacity > CAPACITY_STEP:
            self._keys, self._values, self.rows, self.capacity = [], [], 0, 0
            self._resize(1, min(CAPACITY_STEP, self.max_capacity))

    def _resize(self, rows: int, capacity: int) -> None:
        np, shape = self._np, (rows, self.layout.kv_heads, capacity, self.layout.head_size)
        keys = [np.zeros(shape, np.float32) for _ in range(self.layout.layers)]
        values = [np.zeros(shape, np.float32) for _ in range(self.layout.layers)]
        if self.rows:  # what lies beyond the new shape holds nothing (reserve's caller says so)
            kept, length = min(rows, self.rows), min(capacity, self.capacity)
            for old, new in zip(self._keys + self._values, keys + values, strict=True):
                new[:kept, :, :length] = old[:kept, :, :length]
        self._keys, self._values, self.rows, self.capacity = keys, values, rows, capacity
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self._bindings: dict[int, tuple[tuple[int, int], Any]] = {}  # by session; the old buffers are gone

    def read_slot(self, slot: int, length: int) -> Any:
        """A copy of the first `length` tokens' KV in `slot`: [layers, 2, kv_heads, length, head_size]."""
        layout = self.layout
        kv = self._np.empty((layout.layers, 2, layout.kv_heads, length, layout.head_size), self._np.float32)
        for layer, (k, v) in enumerate(zip(self._keys, self._values, strict=True)):
            kv[layer, 0] = k[slot, :, :length]
            kv[layer, 1] = v[slot, :, :length]
        return kv

    def write_slot(self, slot: int, kv: Any, length: int) -> None:
        """Put the first `length` tokens of `kv` (as read_slot returns it) into `slot`."""
        self.ensure(slot, length)
        for layer, (k, v) in enumerate(zip(self._keys, self._values, strict=True)):
            k[slot, :, :length] = kv[layer, 0, :, :length]
            v[slot, :, :length] = kv[layer, 1, :, :length]

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Move the first `length` tokens' KV of slot `source` into slot `target`."""
        for buffer in self._keys + self._values:
            buffer[target, :, :length] = buffer[source, :, :length]

    # --- running the graph ---------------------------------------------------------------------

    def prefill_fresh(self, slots: list[int], prompts: list[list[int]], pad: int) -> Any:
        """Read first prompts (no past) together, put their KV in `slots`; each row's last logits."""
        np = self._np
        width = max(len(p) for p in prompts)
        self.ensure(max(slots), width)
        ids = np.full((len(prompts), width), pad, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        empty = np.zeros((len(prompts), self.layout.kv_heads, 0, self.layout.head_size), np.float32)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        lasts = [row * width + len(p) - 1 for row, p in enumerate(prompts)]
        self._positions(feeds, lasts)
        for layer in range(self.layout.layers):
            feeds[self.layout.key_name % layer] = empty
            feeds[self.layout.value_name % layer] = empty
        logits, keys, values = self._outputs(self._prompt_session.run(None, feeds))
        for row, (slot, prompt) in enumerate(zip(slots, prompts, strict=True)):
            n = len(prompt)
            for layer in range(self.layout.layers):
                self._keys[layer][slot, :, :n] = keys[layer][row, :, :n]
                self._values[layer][slot, :, :n] = values[layer][row, :, :n]
        return logits[0] if self.selects_positions else logits.reshape(-1, logits.shape[-1])[lasts]

    def extend(self, slot: int, past: int, tokens: list[int], all_logits: bool = False) -> Any:
        """Read `tokens` into `slot`, after the `past` tokens it holds; the last token's logits (or
        every token's, [len(tokens), vocab]). With no past, in pieces (PROMPT_PIECE)."""
        pieces = self.pieces(len(tokens)) if past == 0 else 1
        self.ensure(slot, past + len(tokens))  # once: not a grown buffer per piece
        bounds = [len(tokens) * piece // pieces for piece in range(pieces + 1)]
        logits = [self._extend(slot, past + start, tokens[start:end], all_logits) for start, end in pairwise(bounds)]
        return self._np.concatenate(logits) if all_logits else logits[-1]

    @staticmethod
    def pieces(tokens: int) -> int:
        """How many pieces a prompt of `tokens` tokens with no past is read in when read alone."""
        return max(1, int(tokens / PROMPT_PIECE + 0.5))

    def _extend(self, slot: int, past: int, tokens: list[int], all_logits: bool) -> Any:
        """extend() in one run of the prompt graph (the slot's room ensured by extend())."""
        np = self._np
        ids = np.asarray([tokens], dtype=np.int64)
        mask = np.ones((1, past + len(tokens)), dtype=np.int64)
        wanted = list(range(len(tokens))) if all_logits else [len(tokens) - 1]
        logits = self._run(self._prompt_session, ids, mask, slot, slot + 1, wanted)
        return logits[0] if all_logits else logits[0, -1]

    def decodes_on_prefill_graph(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs on the prefill graph."""
        return 0 < self.prefill_graph_decode_rows <= rows

    def decode(self, tokens: dict[int, int], lengths: list[int], pad: int) -> Any:
        """One step for the slots in `tokens` (slot -> its next token), each after the `lengths[slot]`
        tokens it holds; logits [slots up to the highest one given, vocab]. Slots not given run a pad
        token whose KV lands just past what they hold, where their next write goes anyway. Many rows
        run on the prefill graph (decodes_on_prefill_graph)."""
        np = self._np
        rows = max(tokens) + 1
        self.ensure(rows - 1, max(lengths[:rows]) + 1)
        ids = np.full((rows, 1), pad, dtype=np.int64)
        for slot, token in tokens.items():
            ids[slot, 0] = token
        width = max(lengths[:rows]) + 1
        mask = np.zeros((rows, width), dtype=np.int64)
        for slot in range(rows):
            mask[slot, : lengths[slot] + 1] = 1
        session = self._prompt_session if self.decodes_on_prefill_graph(len(tokens)) else self._session
        logits = self._run(session, ids, mask, 0, rows, list(range(rows)))
        return logits[0] if self.selects_positions else logits[:, -1]

    def _positions(self, feeds: dict[str, Any], wanted: list[int]) -> None:
        if self.selects_positions:
            feeds[POSITIONS] = self._np.asarray(wanted, dtype=self._np.int64)

    def _run(self, session: Any, ids: Any, mask: Any, first: int, end: int, wanted: list[int]) -> Any:
        """Run `session` over slots first..end-1 in place; logits of the `wanted` positions ([1,
        len(wanted), vocab]) where the graph selects positions, else of every position."""
        binding = self._kv_binding(session, first, end)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.selects_positions:
            binding.bind_cpu_input(POSITIONS, self._np.asarray(wanted, dtype=self._np.int64))
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()

    def _kv_binding(self, session: Any, first: int, end: int) -> Any:
        """An IO binding of `session` with slots first..end-1 bound as past and present; kept while
        the buffer and the slot range stay the same (decode steps run over the same range step after
        step, and binding 2 x layers values each step took a measurable share of a small model's step)."""
        kept = self._bindings.get(id(session))
        if kept is not None and kept[0] == (first, end):
            return kept[1]
        ort = self._ort
        binding = session.io_binding()
        names = ((self.layout.key_name, self.layout.present_key_name, self._keys),
                 (self.layout.value_name, self.layout.present_value_name, self._values))  # fmt: skip
        for past_name, present_name, buffers in names:
            for layer, buffer in enumerate(buffers):
                # The same memory as past and present: GQA appends the new tokens in place.
                value = ort.OrtValue.ortvalue_from_numpy(buffer[first:end])
                binding.bind_ortvalue_input(past_name % layer, value)
                binding.bind_ortvalue_output(present_name % layer, value)
        self._bindings[id(session)] = ((first, end), binding)
        return binding

    def logits_in_chunks(self, tokens: list[int], chunk: int) -> Any:
        """Every position's logits for `tokens`, read `chunk` tokens at a time (teacher forcing), in
        buffers of its own: no slot is touched, so scoring runs beside live requests."""
        np = self._np
        empty = np.zeros((1, self.layout.kv_heads, 0, self.layout.head_size), np.float32)
        keys, values = [empty] * self.layout.layers, [empty] * self.layout.layers
        for start in range(0, len(tokens), chunk):
            ids = np.asarray([tokens[start : start + chunk]], dtype=np.int64)
            feeds: dict[str, Any] = {
                "input_ids": ids,
                "attention_mask": np.ones((1, start + ids.shape[1]), dtype=np.int64),
            }
            self._positions(feeds, list(range(ids.shape[1])))
            for layer in range(self.layout.layers):
                feeds[self.layout.key_name % layer] = keys[layer]
                feeds[self.layout.value_name % layer] = values[layer]
            logits, keys, values = self._outputs(self._prompt_session.run(None, feeds))
            yield logits[0]

    def _outputs(self, outputs: list[Any]) -> tuple[Any, list[Any], list[Any]]:
        """(logits, presents' keys by layer, values by layer) from a run's outputs, by name."""
        named = dict(zip(self._output_names, outputs, strict=True))
        layers = range(self.layout.layers)
        keys = [named[self.layout.present_key_name % layer] for layer in layers]
        return named["logits"], keys, [named[self.layout.present_value_name % layer] for layer in layers]


POSITIONS = "logits_positions"


def _steps(tokens: int) -> int:
    """`tokens` rounded up to whole CAPACITY_STEPs."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def _with_position_selection(model_file: Path, layout: Layout) -> bytes | None:
    """The graph with a Gather of the `logits_positions` rows of the final hidden states before the
    LM head, serialized (weights stay in their external file); None where the LM head is not one
    matrix product of the final hidden states (the graph then runs as exported)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    heads = [node for node in graph.node if "logits" in node.output]
    if len(heads) != 1 or heads[0].op_type not in ("MatMulNBits", "MatMul"):
        log.info("%s: logits for every position (LM head %s)", model_file, [n.op_type for n in heads])
        return None
    head = heads[0]
    graph.input.append(helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["positions"]))
    graph.initializer.extend(
        [
            helper.make_tensor("slmflow/flat_shape", TensorProto.INT64, [2], [-1, layout.hidden_size]),
            helper.make_tensor("slmflow/axis0", TensorProto.INT64, [1], [0]),
        ]
    )
    picked = [
        helper.make_node("Reshape", [head.input[0], "slmflow/flat_shape"], ["slmflow/flat"]),
        helper.make_node("Gather", ["slmflow/flat", POSITIONS], ["slmflow/picked"], axis=0),
        helper.make_node("Unsqueeze", ["slmflow/picked", "slmflow/axis0"], ["slmflow/hidden"]),
    ]
    at = list(graph.node).index(head)
    for offset, node in enumerate(picked):
        graph.node.insert(at + offset, node)
    head.input[0] = "slmflow/hidden"
    return model.SerializeToString()
