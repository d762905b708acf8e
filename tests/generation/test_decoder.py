"""The direct decoder (generation/decoder.py) on the tiny fixture: KV slots, batched decoding of rows
at different lengths, logits of the positions wanted, and the graphs it leaves to ONNX Runtime GenAI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slmflow.generation.decoder import PREFILL_FILE, Decoder, UnsupportedGraph, layout_of
from tests.conftest import prompt_reads


@pytest.fixture(scope="module", params=["builder graph", "prefill graph"])
def decoder(request: pytest.FixtureRequest, onnx_int4: Path, onnx_int4_prefill: Path) -> Decoder:
    """Every test here runs with prompts read by the builder's graph and by a prefill graph."""
    folder = onnx_int4_prefill if request.param == "prefill graph" else onnx_int4
    config = json.loads((folder / "genai_config.json").read_text())
    layout, model_file = layout_of(config, folder)
    prefill = folder / PREFILL_FILE if request.param == "prefill graph" else None
    context = int(config["model"]["context_length"])
    return Decoder(model_file, layout, slots=4, threads=1, max_capacity=context, prefill_file=prefill)


PROMPTS = [[1, 5, 9, 12, 40, 41, 42], [1, 7, 3], [1, 8, 8, 8, 8, 20, 21, 22, 23, 24, 25]]


def greedy_alone(decoder: Decoder, prompt: list[int], steps: int) -> list[int]:
    token = int(np.argmax(decoder.extend(0, 0, prompt)))
    tokens = [token]
    for step in range(steps - 1):
        token = int(np.argmax(decoder.decode({0: token}, [len(prompt) + step, 0, 0, 0], pad=0)[0]))
        tokens.append(token)
    return tokens


def test_rows_at_different_lengths_decode_together_as_alone(decoder: Decoder) -> None:
    alone = [greedy_alone(decoder, prompt, 12) for prompt in PROMPTS]
    # Slots 0 and 2 read first prompts together; slot 1 reads its prompt alone (a prompt after a
    # past would be read this way): all three then decode in one batch.
    logits = decoder.prefill_fresh([0, 2], [PROMPTS[0], PROMPTS[2]], pad=0)
    tokens = {0: int(np.argmax(logits[0])), 2: int(np.argmax(logits[1]))}
    tokens[1] = int(np.argmax(decoder.extend(1, 0, PROMPTS[1])))
    together: dict[int, list[int]] = {slot: [token] for slot, token in tokens.items()}
    lengths = [len(PROMPTS[0]), len(PROMPTS[1]), len(PROMPTS[2]), 0]
    for _ in range(11):
        step = decoder.decode(tokens, lengths, pad=0)
        for slot in tokens:
            lengths[slot] += 1
            tokens[slot] = int(np.argmax(step[slot]))
            together[slot].append(tokens[slot])
    assert [together[0], together[1], together[2]] == alone


def test_a_kept_prefix_copied_into_another_slot_continues_as_the_original(decoder: Decoder) -> None:
    prompt = PROMPTS[2]
    whole = decoder.extend(0, 0, prompt)
    decoder.extend(3, 0, prompt[:6])
    kept = decoder.read_slot(3, 6)
    decoder.write_slot(1, kept, 6)
    rest = decoder.extend(1, 6, prompt[6:])
    assert int(np.argmax(rest)) == int(np.argmax(whole))
    np.testing.assert_allclose(rest, whole, atol=1e-3)


def test_logits_of_every_position_equal_the_chunked_scoring_logits(decoder: Decoder) -> None:
    prompt = PROMPTS[0] + PROMPTS[2]
    every = decoder.extend(0, 0, prompt, all_logits=True)
    chunked = np.concatenate(list(decoder.logits_in_chunks(prompt, chunk=5)))
    assert decoder.selects_positions and every.shape == chunked.shape == (len(prompt), decoder.layout.vocab_size)
    np.testing.assert_allclose(every, chunked, atol=1e-3)
    np.testing.assert_allclose(every[-1], decoder.extend(0, 0, prompt), atol=1e-5)


def test_a_prompt_with_no_past_is_read_in_pieces_that_give_the_logits_of_one_read(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmflow.generation import decoder as module

    runs = prompt_reads(decoder, monkeypatch)
    prompt = (PROMPTS[0] + PROMPTS[2] + PROMPTS[1]) * 2  # 42 tokens

    def read(piece: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Last logits, every position's logits and 6 greedy tokens after the prompt, PROMPT_PIECE = piece."""
        monkeypatch.setattr(module, "PROMPT_PIECE", piece)
        every = decoder.extend(0, 0, prompt, all_logits=True)
        token = int(np.argmax(decoder.extend(0, 0, prompt)))
        tokens = [token]
        for step in range(5):
            token = int(np.argmax(decoder.decode({0: token}, [len(prompt) + step, 0, 0, 0], pad=0)[0]))
            tokens.append(token)
        return every[-1], every, tokens

    whole = read(10**6)
    assert runs == [42, 42]
    runs.clear()
    pieces = read(10)  # 42 / 10 -> 4 pieces (of 10, 11, 10, 11 tokens)
    assert runs == [10, 11, 10, 11] * 2
    np.testing.assert_allclose(pieces[0], whole[0], atol=1e-4)
    np.testing.assert_allclose(pieces[1], whole[1], atol=1e-4)
    assert pieces[2] == whole[2]
    runs.clear()
    decoder.extend(0, len(prompt), prompt)  # after a past: read whole
    decoder.extend(1, 0, prompt[:14])  # 14 / 10 rounds to 1 piece
    assert runs == [42, 14]


def test_the_buffer_holds_the_slots_in_use_and_shrinks_when_idle(decoder: Decoder) -> None:
    decoder.shrink()
    one_slot = decoder.nbytes
    assert decoder.rows == 1
    decoder.extend(0, 0, [1] * 300)  # longer than a capacity step: only slot 0 grows
    assert decoder.rows == 1 and decoder.capacity >= 300
    decoder.extend(3, 0, PROMPTS[0])
    assert decoder.rows == 4
    decoder.shrink()
    assert decoder.rows == 1 and decoder.nbytes == one_slot


def test_a_row_moved_to_a_lower_slot_and_the_buffer_cut_to_it_decodes_on(decoder: Decoder) -> None:
    prompt = PROMPTS[0]
    alone = greedy_alone(decoder, prompt, 6)
    decoder.shrink()
    token = int(np.argmax(decoder.extend(3, 0, prompt)))
    assert decoder.rows == 4
    decoder.move_slot(3, 0, len(prompt))
    decoder.max_bytes = decoder.bytes_for(1, len(prompt) + 6)
    try:
        decoder.reserve(1, len(prompt) + 6)  # over max_bytes; slots 1-3 hold nothing now: cut to one
        assert decoder.rows == 1 and decoder.nbytes <= decoder.max_bytes
        tokens = [token]
        for step in range(5):
            token = int(np.argmax(decoder.decode({0: token}, [len(prompt) + step], pad=0)[0]))
            tokens.append(token)
    finally:
        decoder.max_bytes = None
    assert tokens == alone


def test_growth_stays_within_max_bytes_but_what_is_asked_for_is_given(decoder: Decoder) -> None:
    decoder.shrink()
    decoder.max_bytes = decoder.bytes_for(2, 1280)
    try:
        decoder.ensure(1, 1000)  # two slots of 1,024 tokens: within max_bytes
        assert (decoder.rows, decoder.capacity) == (2, 1024)
        decoder.ensure(1, 1100)  # half again (1,536) would not fit: 1,280, the least room asked for
        assert (decoder.rows, decoder.capacity) == (2, 1280) and decoder.nbytes <= decoder.max_bytes
        decoder.ensure(3, 1100)  # four slots do not fit: given all the same (the batcher keeps within it)
        assert (decoder.rows, decoder.capacity) == (4, 1280) and decoder.peak_bytes == decoder.nbytes
        decoder.reserve(2, 1100)  # over max_bytes, and less asked for: cut back within it
        assert (decoder.rows, decoder.capacity) == (2, 1280) and decoder.nbytes <= decoder.max_bytes
    finally:
        decoder.max_bytes = None
        decoder.shrink()


def test_gpu_builds_and_unknown_inputs_are_left_to_onnx_runtime_genai(onnx_int4: Path) -> None:
    config = json.loads((onnx_int4 / "genai_config.json").read_text())
    cuda = json.loads(json.dumps(config))
    cuda["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {}}]
    with pytest.raises(UnsupportedGraph):
        layout_of(cuda, onnx_int4)
    extra = json.loads(json.dumps(config))
    extra["model"]["decoder"]["inputs"]["position_ids"] = "position_ids"
    with pytest.raises(UnsupportedGraph):
        layout_of(extra, onnx_int4)
