"""Prefix (KV cache) reuse: the Generators of finished requests, kept with what they have read.

A chat client sends the whole conversation every turn. A request whose prompt starts with the prompt
a kept Generator has read (a conversation that continues, a shared system prompt) takes that
Generator, rewinds it to the shared prefix and reads only the rest, instead of prefilling all of it.
Only prompts are offered for reuse, never generated tokens: their KV was computed by the decode
kernels, which differ from the prefill ones in the last bits on quantized models (enough to flip a
greedy answer on SmolLM2 int8), so the previous answer is read again with the new message.

Limits, from ONNX Runtime GenAI 0.18 (see docs/serving.md): `Generator.rewind_to` keeps a prefix
only for batch size 1, and one Generator's KV state cannot move into another. So only requests that
run alone are kept and reused, and a Generator's KV buffer is sized when it is made: a Generator
meant for keeping gets `headroom` tokens of room beyond its request, so the next turn fits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    generator: Any  # onnxruntime_genai.Generator, batch size 1
    tokens: list[int]  # the prompt it read (a prefill computed their KV)
    key: tuple  # the search options it was made with
    max_length: int  # its KV buffer, in tokens
    nbytes: int


class PrefixCache:
    """Kept Generators, least recently used first out, within `budget_bytes` of KV buffers."""

    def __init__(self, budget_bytes: int, bytes_per_token: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, max_length: int) -> bool:
        """Could a Generator of this size be kept at all?"""
        return 0 < max_length * self.bytes_per_token <= self.budget_bytes

    def take(self, key: tuple, prompt: list[int], needed_length: int, min_prefix: int) -> tuple[Any, int, int] | None:
        """The kept Generator sharing the longest prefix with `prompt` (at least `min_prefix` tokens),
        made with `key` and with room for `needed_length` tokens, rewound to where `prompt` departs
        from it: (generator, tokens of `prompt` it already holds, its KV buffer's length). It leaves
        the cache."""
        best, best_id, best_reuse = None, -1, 0
        for entry_id, entry in self._entries.items():
            if entry.key != key or entry.max_length < needed_length:
                continue
            # The prompt's last token is always read anew: its logits choose the first new token.
            reuse = min(_common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if reuse > best_reuse:
                best, best_id, best_reuse = entry, entry_id, reuse
        if best is None or best_reuse < min_prefix:
            return None
        del self._entries[best_id]
        best.generator.rewind_to(best_reuse)
        return best.generator, best_reuse, best.max_length

    def put(self, generator: Any, tokens: list[int], key: tuple, max_length: int) -> None:
        """Keep `generator`, dropping the least recently used ones to stay within the budget."""
        nbytes = max_length * self.bytes_per_token
        if nbytes > self.budget_bytes:
            return
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
        self._entries[self._next_id] = _Entry(generator, tokens, key, max_length, nbytes)
        self._next_id += 1

    def clear(self) -> None:
        self._entries.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
