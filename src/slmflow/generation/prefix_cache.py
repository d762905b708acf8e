"""Prefix (KV cache) reuse: the KV of recent prompts, kept within a memory budget.

A chat client sends the whole conversation every turn. A request whose prompt starts with a kept
prompt (a conversation that continues, a shared system prompt) gets that prompt's KV copied into
its slot and reads only the rest, instead of prefilling all of it (generation/continuous.py).
Only prompts are kept, never generated tokens: their KV was computed by the decode kernels, which
differ from the prefill ones in the last bits on quantized models (enough to flip a greedy answer on
SmolLM2 int8), so the previous answer is read again with the new message.

An entry is a copy, not a loan: one kept system prompt serves any number of requests at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    tokens: list[int]  # the prompt (a prefill computed its KV)
    kv: Any  # numpy [layers, 2, kv_heads, len(tokens), head_size]
    nbytes: int


class PrefixCache:
    """Kept prompts' KV, least recently used first out, within `budget_bytes`."""

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

    def fits(self, tokens: int) -> bool:
        """Could a prompt of this many tokens be kept at all?"""
        return 0 < tokens * self.bytes_per_token <= self.budget_bytes

    def holds(self, prompt: list[int]) -> bool:
        """Is `prompt` (or a longer prompt starting with it) kept already?"""
        return any(_common_prefix(entry.tokens, prompt) == len(prompt) for entry in self._entries.values())

    def find(self, prompt: list[int], min_prefix: int) -> tuple[Any, int] | None:
        """The KV of the kept prompt sharing the longest prefix with `prompt` (at least `min_prefix`
        tokens) and how many of `prompt`'s tokens it covers; it becomes the most recently used."""
        best_id, best_reuse = -1, 0
        for entry_id, entry in self._entries.items():
            # The prompt's last token is always read anew: its logits choose the first new token.
            reuse = min(_common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if reuse > best_reuse:
                best_id, best_reuse = entry_id, reuse
        if best_reuse < min_prefix:
            return None
        self._entries.move_to_end(best_id)
        return self._entries[best_id].kv, best_reuse

    def put(self, tokens: list[int], kv: Any) -> None:
        """Keep `tokens`' KV; kept prompts it extends go (it serves them too), then the least
        recently used ones until it fits the budget."""
        nbytes = int(kv.nbytes)
        if nbytes > self.budget_bytes:
            return
        for entry_id, entry in list(self._entries.items()):
            if _common_prefix(entry.tokens, tokens) == len(entry.tokens):
                del self._entries[entry_id]
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
        self._entries[self._next_id] = _Entry(list(tokens), kv, nbytes)
        self._next_id += 1

    def clear(self) -> None:
        self._entries.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
