"""Choosing each request's next token from its logits: greedy, or sampled with its own random stream.

Used by the engine's direct decoder (generation/decoder.py). Every request samples with a generator
of its own, seeded from its `seed` when it has one, so a seeded answer is the same whatever else
runs in its batch.
"""

from __future__ import annotations

from typing import Any

from slmflow.generation.params import SamplingParams


class Sampler:
    """One request's token choice: temperature, top-k, top-p, and no end-of-sequence before min_tokens."""

    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int]) -> None:
        import numpy as np

        self._np = np
        self.params = params
        self._eos = np.fromiter(sorted(eos_token_ids), dtype=np.int64)
        self._eos_set = eos_token_ids
        # numpy seeds are non-negative; OpenAI's may be any int64 (each maps to its own stream).
        seed = None if params.seed is None else params.seed % 2**64
        self._random = np.random.default_rng(seed) if not params.greedy else None

    def pick(self, logits: Any, generated: int, argmax: int | None = None) -> int:
        """The next token, given its logits [vocab] and how many tokens the request has generated
        (`argmax`: the logits' argmax, when the caller computed it for a whole batch at once)."""
        np, p = self._np, self.params
        # Held to min_tokens, a greedy row's end-of-sequence tokens are masked: that changes its
        # choice only when the argmax is one of them (no copy of the row's logits otherwise).
        if self._random is None and argmax is not None and (generated >= p.min_tokens or argmax not in self._eos_set):
            return argmax
        if generated < p.min_tokens and len(self._eos):
            logits = logits.copy()
            logits[self._eos] = -np.inf
        if self._random is None:
            return int(np.argmax(logits))
        # Shifted before dividing, so the top token is 0 and the rest <= 0: logits / 1e-320 overflow
        # to infinity, and infinity minus infinity made every weight NaN (found by the fuzzer).
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the top to -inf: weight 0
            scaled = (logits - logits.max()) / p.temperature
        candidates = np.arange(len(scaled))
        if p.top_k and p.top_k < len(scaled):
            candidates = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
        weights = np.exp(scaled[candidates])
        weights /= weights.sum()
        if p.top_p is not None and p.top_p < 1.0:
            # The smallest set of most likely tokens whose probability reaches top_p.
            keep = int(np.searchsorted(np.cumsum(weights), p.top_p) + 1)
            candidates, weights = candidates[:keep], weights[:keep] / weights[:keep].sum()
        return int(candidates[self._random.choice(len(candidates), p=weights)])
