"""Iteration-level (continuous) batching over the direct decoder's KV slots.

Each admitted request takes a free slot. Every step reads some prompt tokens (newcomers' prompts,
in chunks while others are decoding, so no running answer stalls for a whole long prompt) and then
decodes one token for every row whose prompt is read. Requests join and leave between any two
steps; none waits for a running batch to end, and no running row is re-read when one joins.

Prefix reuse: when a request ends, the KV of its prompt is kept (generation/prefix_cache.py). A
newcomer whose prompt starts the same way gets that KV copied into its slot and reads only the rest.

Memory: the KV buffer stays within the decoder's max_bytes. When the next step would not fit, the
newest requests are parked (their KV dropped, their tokens so far kept) until it does, and resume,
oldest first, by reading their prompt and answer so far again when they fit: the oldest request
always runs, and a lone request always fits (the engine sizes the budget so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from slmflow.generation.decoder import Decoder
from slmflow.generation.prefix_cache import PrefixCache
from slmflow.generation.sampling import Sampler

log = logging.getLogger(__name__)

# At most this many token positions (rows x longest prompt) in one batched read of fresh prompts.
FRESH_RUN_TOKENS = 2048
# A batched read of fresh prompts computes every row to the longest one's length. At most this many
# positions per prompt token: 16 prompts of 30 to 100 tokens read as one run computed 1.6 positions
# per token, and read at 0.62x of the speed of reading them one by one (SmolLM2 int8).
FRESH_PADDING = 1.2


class Row(Protocol):
    """What the engine's rows offer (engine._Row)."""

    finished: bool
    cached_tokens: int
    request: Any
    tokens: list[int]  # generated so far

    @property
    def generated(self) -> int: ...
    def step(self, token: int, eos: frozenset[int]) -> None: ...


@dataclass(eq=False)
class _Live:
    row: Row
    slot: int
    sampler: Sampler
    length: int = 0  # tokens whose KV is in the slot
    todo: list[int] | None = None  # prompt tokens still to read
    next_token: int | None = None  # sampled, to be read by the next decode step
    resume: int | None = None  # a parked row's next token, to decode once its tokens are read again

    @property
    def prompt(self) -> list[int]:
        return self.row.request.prompt_ids


class ContinuousBatcher:
    """The running rows of a direct-decoder engine; driven by the engine's owner thread."""

    def __init__(
        self,
        decoder: Decoder,
        prefixes: PrefixCache,
        *,
        eos_token_ids: frozenset[int],
        pad_token_id: int,
        prefill_chunk: int,
        prefix_min_tokens: int,
        stats: Any,
    ) -> None:
        self.decoder = decoder
        self.prefixes = prefixes
        self.eos = eos_token_ids
        self.pad = pad_token_id
        self.prefill_chunk = prefill_chunk
        self.prefix_min_tokens = prefix_min_tokens
        self.stats = stats
        self._live: list[_Live] = []
        self._parked: list[_Live] = []  # oldest first; they hold no slot

    @property
    def idle(self) -> bool:
        return not self._live and not self._parked

    @property
    def free_slots(self) -> int:
        """Slots for newcomers: none while parked rows wait (they go first)."""
        return 0 if self._parked else self.decoder.slots - len(self._live)

    def admit(self, rows: Sequence[Row]) -> None:
        """Take rows (at most free_slots): each gets a slot, and the KV of the longest kept prefix of
        its prompt, at the next step where it fits."""
        for row in rows:
            self._parked.append(
                _Live(row, -1, Sampler(row.request.params, self.eos), todo=list(row.request.prompt_ids))
            )

    def _free_slot(self) -> int | None:
        used = {live.slot for live in self._live}
        return next((slot for slot in range(self.decoder.slots) if slot not in used), None)

    def step(self) -> None:
        """Read prompt tokens, then decode one token for every row whose prompt is read."""
        try:
            self._drop_cancelled()
            self._make_room()
            self._prefill()
            self._decode()
        except Exception as e:
            from slmflow.errors import SlmflowError

            log.exception("generation failed for %d request(s)", len(self._live))
            for live in self._live:
                if not live.row.finished:
                    live.row.finished = True
                    live.row.request.put("error", SlmflowError(f"generation failed: {e}"))
                    self.stats.finished["error"] += 1
            self._live = []
        self._retire()

    def fail_all(self, error: Exception) -> None:
        for live in self._live + self._parked:
            live.row.request.put("error", error)
        self._live, self._parked = [], []

    # --- memory --------------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Fit this step's KV within the decoder's max_bytes: resume parked rows that fit, oldest
        first; park the newest running rows while the step does not fit."""
        while self._parked and (slot := self._free_slot()) is not None:
            live = self._parked[0]
            live.slot = slot
            if self._live and not self._fits(self._live, also=live):
                live.slot = -1
                break
            self._live.append(self._parked.pop(0))
            self._reuse(live)
        self.stats.prefix_cache_bytes = self.prefixes.nbytes
        while self._live and not self._fits(self._live):
            if self._compact():
                continue
            if len(self._live) == 1:
                break  # a lone row always runs (the engine makes max_bytes hold one at full length)
            self._park(max(self._live, key=lambda live: live.row.request.number))
        if self._live:
            self.decoder.reserve(*self._shape(self._live))
        self.stats.running = len(self._live)

    def _shape(self, rows: list[_Live]) -> tuple[int, int]:
        """(slots, tokens per slot) that `rows` need for one step: what they hold, the prompt chunk
        each may read, and one decoded token."""
        tokens = max(live.length + min(len(live.todo or ()), self.prefill_chunk) + 1 for live in rows)
        return max(live.slot for live in rows) + 1, tokens

    def _fits(self, rows: list[_Live], also: _Live | None = None) -> bool:
        """Whether `rows` fit for a step, with `also` (parked, to resume) holding all it has to read
        (a kept prefix may be written at once; and it would be parked again at once otherwise)."""
        limit = self.decoder.max_bytes
        if limit is None:
            return True
        slots, tokens = self._shape(rows if also is None else [*rows, also])
        if also is not None:
            tokens = max(tokens, len(also.todo or ()) + 1)
        return self.decoder.bytes_for(slots, tokens) <= limit

    def _compact(self) -> bool:
        """Move the row in the highest slot to the lowest free one, if lower: the buffer holds every
        slot up to the highest one used."""
        top = max(self._live, key=lambda live: live.slot)
        free = self._free_slot()
        if free is None or free > top.slot:
            return False
        self.decoder.move_slot(top.slot, free, top.length)
        top.slot = free
        return True

    def _park(self, live: _Live) -> None:
        """Drop the row's KV, keeping what it must read again to go on: its prompt and its tokens so
        far but the last, which it goes on with (sampled, not yet read; or, for a row parked again
        while reading them again, the one it had)."""
        if live.next_token is not None:
            live.resume = live.next_token
        live.todo = live.prompt + live.row.tokens[:-1]
        live.length, live.next_token, live.slot = 0, None, -1
        self._live.remove(live)
        self._parked.append(live)
        self._parked.sort(key=lambda parked: parked.row.request.number)
        self.stats.parked += 1

    # --- prompt reading ------------------------------------------------------------------------

    def _reuse(self, live: _Live) -> None:
        todo = live.todo or []
        if len(todo) <= self.prefix_min_tokens or not len(self.prefixes):
            return
        found = self.prefixes.find(todo, self.prefix_min_tokens)
        if found is None:
            self.stats.prefix_misses += 1
            return
        kv, reused = found
        self.decoder.write_slot(live.slot, kv, reused)
        live.length, live.todo = reused, todo[reused:]
        if live.resume is None:  # usage counts the prompt's first read, not a parked row's re-read
            live.row.cached_tokens = reused
        self.stats.prefix_hits += 1
        self.stats.prefix_cached_tokens += reused

    def _prefill(self) -> None:
        """Read prompts: short fresh ones of about the same length together (_batchable), the others
        a chunk at a time at batch size 1. While rows are decoding, about one chunk's worth per step,
        so their answers keep coming. Shortest first: the most requests get their first token
        soonest. Long prompts one chunk per step even when nothing decodes: a chunk of each per step
        gave every prompt its first token only at the end of the whole read. Measured, SmolLM2 int8,
        16 prompts of 1,500 tokens at once (same process, 2 rounds): median time to first token
        24.6-28.2 s before, 15.5-16.8 s one after the other (the first decodes while the next are
        read); total time 42.2-47.1 s before, 38.8-41.9 s after."""
        reading = [live for live in self._live if live.todo]
        if not reading:
            return
        decoding = any(live.next_token is not None for live in self._live)
        budget = self.prefill_chunk if decoding else None
        fresh = [live for live in reading if live.length == 0 and self._batchable(len(live.todo or ()))]
        fresh.sort(key=lambda live: len(live.todo or ()))
        while fresh:
            group = self._fit(fresh, budget)
            fresh = fresh[len(group) :]
            if len(group) == 1:
                continue  # read alone below
            prompts = [f.todo or [] for f in group]
            logits = self.decoder.prefill_fresh([f.slot for f in group], prompts, self.pad)
            self._read(sum(map(len, prompts)), positions=len(group) * max(map(len, prompts)))
            for live, prompt, row_logits in zip(group, prompts, logits, strict=True):
                live.length, live.todo = len(prompt), None
                self._read_whole(live, row_logits)
            if budget is not None:
                return
        reading = sorted((live for live in reading if live.todo), key=lambda live: len(live.todo or ()))
        # A whole chunk's worth: while rows decode, the fresh reads above returned if they read any.
        budget = self.prefill_chunk
        for live in reading:
            todo = live.todo or []
            chunk = todo[:budget]
            logits = self.decoder.extend(live.slot, live.length, chunk)
            self._read(len(chunk), positions=len(chunk))
            live.length += len(chunk)
            live.todo = todo[len(chunk) :] or None
            if live.todo is None:
                self._read_whole(live, logits)
            budget -= len(chunk)
            if budget <= 0:
                return

    def _batchable(self, tokens: int) -> bool:
        """Whether a fresh prompt of `tokens` tokens is read together with others: not when longer
        than a chunk, nor when read alone it would be read in pieces (Decoder.extend), which spares
        the part of a batched run's S x S attention that the causal mask zeroes. Measured, SmolLM2
        int8, one engine toggled, 7 alternated rounds: 4 prompts of 512 sent together, total 0.89x
        and 0.94x (two runs), median first token 1.37 -> 0.68 s; 8 x 400 and 16 x 400 total 1.01x,
        first token 1.14 -> 0.98 s and 2.26 -> 1.92 s."""
        return tokens <= self.prefill_chunk and self.decoder.pieces(tokens) == 1

    def _read_whole(self, live: _Live, logits: Any) -> None:
        """A row's tokens are all read: sample its next one, or go on with the one it had when parked."""
        if live.resume is None:
            self._sampled(live, logits)
        else:
            live.next_token, live.resume = live.resume, None

    def _read(self, tokens: int, *, positions: int) -> None:
        """Count prompt tokens read, and the positions computed to read them (padding included)."""
        self.stats.prompt_tokens += tokens
        self.stats.prompt_positions += positions

    def _fit(self, fresh: list[_Live], budget: int | None) -> list[_Live]:
        """The first of `fresh` (shortest first) to read in one run: within the budget while others
        decode; within FRESH_PADDING positions per token; and within FRESH_RUN_TOKENS (rows x longest
        prompt) always, since the graph's presents hold every row at the longest one's length."""
        taken: list[_Live] = []
        total = 0
        for live in fresh:
            length = len(live.todo or ())
            positions = length * (len(taken) + 1)  # the newcomer is the longest so far
            over_budget = budget is not None and total + length > budget
            too_padded = positions > FRESH_PADDING * (total + length)
            if taken and (over_budget or too_padded or positions > FRESH_RUN_TOKENS):
                break
            taken.append(live)
            total += length
        return taken

    # --- decoding ------------------------------------------------------------------------------

    def _decode(self) -> None:
        decoding = [live for live in self._live if live.next_token is not None and not live.row.finished]
        if not decoding:
            return
        lengths = [0] * self.decoder.slots
        for live in self._live:
            lengths[live.slot] = live.length
        logits = self.decoder.decode({live.slot: live.next_token or 0 for live in decoding}, lengths, self.pad)
        if self.decoder.decodes_on_prefill_graph(len(decoding)):
            self.stats.prefill_graph_decode_steps += 1
        best = logits.argmax(axis=1)  # one pass for every greedy row
        for live in decoding:
            live.length += 1
            live.next_token = None
            self._sampled(live, logits[live.slot], int(best[live.slot]))

    def _sampled(self, live: _Live, logits: Any, argmax: int | None = None) -> None:
        """Choose the row's next token from `logits` and hand it to the row."""
        row = live.row
        if row.request.cancelled.is_set():
            row.step(0, self.eos)  # a cancelled row drops itself
            return
        token = live.sampler.pick(logits, row.generated, argmax)
        self.stats.generated_tokens += 1  # counted before the row can end, and its caller read the count
        row.step(token, self.eos)
        if not row.finished:
            live.next_token = token

    def _drop_cancelled(self) -> None:
        for live in self._live + self._parked:
            if live.row.request.cancelled.is_set() and not live.row.finished:
                live.row.step(0, self.eos)
        self._parked = [live for live in self._parked if not live.row.finished]

    def _retire(self) -> None:
        """Free the slots of finished rows."""
        for live in self._live:
            if live.row.finished:
                self._ended(live)
        self._live = [live for live in self._live if not live.row.finished]
        self.stats.running = len(self._live)
        if not self._live:
            self.decoder.shrink()
        self.stats.kv_slots_bytes = self.decoder.nbytes
        self.stats.kv_slots_peak_bytes = self.decoder.peak_bytes

    def _ended(self, live: _Live) -> None:
        """A row ended: if it ended well, keep its prompt's KV. After its caller has its answer (the
        copy is not in its way), before anything else is admitted."""
        if self._keepable(live):
            prompt = live.prompt
            self.prefixes.put(prompt, self.decoder.read_slot(live.slot, len(prompt)))
            self.stats.prefix_cache_bytes = self.prefixes.nbytes

    def _keepable(self, live: _Live) -> bool:
        """Worth keeping: a long enough prompt, read whole, not already kept, by a row that ended well.
        Only the prompt: the answer's KV came from decode kernels, which differ from the prefill ones
        in the last bits on quantized models (enough to flip a greedy answer on SmolLM2 int8)."""
        prompt = live.prompt
        return (
            not live.row.request.cancelled.is_set()
            and live.todo is None
            and len(prompt) >= self.prefix_min_tokens
            and live.length >= len(prompt)
            and self.prefixes.fits(len(prompt))
            and not self.prefixes.holds(prompt)
        )
