from __future__ import annotations

import numpy as np

from slmflow.generation.params import SamplingParams
from slmflow.generation.sampling import Sampler

EOS = frozenset({2, 5})


def test_a_greedy_row_held_to_min_tokens_never_picks_an_end_token() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3), EOS)
    logits = np.array([0.0, 1.0, 9.0, 3.0, 2.0, 8.0], dtype=np.float32)  # best: 2 (end), then 5 (end), 3
    for argmax in (None, 2):  # whether or not the batch's argmax is handed in
        assert sampler.pick(logits, generated=0, argmax=argmax) == 3
        assert sampler.pick(logits, generated=3, argmax=argmax) == 2  # min_tokens reached
    assert logits[2] == 9.0 and logits[5] == 8.0  # the caller's logits are left as they were
    plain = np.array([0.0, 1.0, 0.5, 7.0, 2.0, 3.0], dtype=np.float32)
    assert sampler.pick(plain, generated=0, argmax=3) == sampler.pick(plain, generated=0) == 3


def test_a_sampled_row_held_to_min_tokens_never_picks_an_end_token() -> None:
    sampler = Sampler(SamplingParams(temperature=5.0, max_tokens=10, min_tokens=400, seed=1), EOS)
    logits = np.array([0.0, 1.0, 9.0, 1.0, 1.0, 9.0], dtype=np.float32)
    picks = {sampler.pick(logits, generated=0, argmax=2) for _ in range(300)}
    assert picks == {0, 1, 3, 4}
