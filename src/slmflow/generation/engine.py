"""The generation scheduler: one owner thread per loaded model, fed by a request queue.

Every ONNX Runtime call happens on the owner thread, so callers on any thread (pyfunc `predict`,
the HTTP server, a Spark UDF) are safe. Two ways to run requests:

- continuous (the default on CPU): the model's decoder graph run directly (generation/decoder.py)
  with a KV slot per request; requests join and leave between any two steps, and prompts that start
  alike share their KV (generation/continuous.py, generation/prefix_cache.py);
- genai: ONNX Runtime GenAI Generators, batched by restarting (`_batch_key` says what may share a
  batch and why). For graphs the direct decoder does not run (GPU builds), and for requests with a
  grammar (`response_format`), which need ONNX Runtime GenAI's guidance; they run alone.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from slmflow.errors import InvalidRequest, Overloaded, SlmflowError
from slmflow.generation.chat import ChatTemplate, validate_messages
from slmflow.generation.continuous import ContinuousBatcher
from slmflow.generation.decoder import PREFILL_FILE, Decoder, UnsupportedGraph, layout_of
from slmflow.generation.openai import Completion, FinishReason, Usage
from slmflow.generation.params import SamplingParams
from slmflow.generation.prefix_cache import PrefixCache
from slmflow.generation.stops import StopMatcher
from slmflow.generation.tools import Tools, prepare_messages

log = logging.getLogger(__name__)
T = TypeVar("T")
_ids = itertools.count()


@dataclass(frozen=True)
class EngineOptions:
    # Rows generated together. 16 rather than 8 (measured, SmolLM2 int8, 16 prompts at once, 64
    # tokens each): aggregate 341 vs 298 tokens/s, time to first token median 0.52 vs 1.42 s, max
    # 0.84 vs 2.23 s; fewer requests run as they would alone. Memory: see kv_cache_bytes.
    max_batch_size: int = 16
    max_queue: int = 256  # waiting requests; more are refused with Overloaded
    intra_op_threads: int | None = None  # None: every core this process may use
    # A new batch waits while requests keep arriving (each within batch_wait_s of the previous one),
    # for at most max_batch_wait_s: clients that send together share one batch. None: 5 ms for the
    # genai scheduler (a latecomer costs a restart there), 0 for the continuous one (a latecomer
    # joins at the next step; waiting would only add to every lone request's time to first token).
    batch_wait_s: float | None = None
    max_batch_wait_s: float = 0.1
    # genai scheduler: a running batch takes alike requests that arrive during its first join_steps
    # steps, when at least as many can join as are running: it restarts with its rows' text so far
    # as their prompts (one re-read of them) rather than leave the newcomers waiting for its end.
    join_steps: int = 8
    # "auto": the continuous scheduler where the graph allows it, else "genai" (see the module doc).
    scheduler: str = "auto"
    # Continuous scheduler: prompts are read at most this many tokens at a time while other rows are
    # decoding, so a long prompt delays their next tokens by one chunk's time, not by its whole read.
    prefill_chunk: int = 512
    # Prefix reuse (continuous scheduler): the KV of finished requests' prompts is kept, up to this
    # many bytes (0: off), for later requests whose prompts start the same way. Prompts shorter than
    # prefix_min_tokens are cheap to read again and are not kept.
    prefix_cache_bytes: int = 1 << 30
    prefix_min_tokens: int = 256
    # Continuous scheduler: the running requests' KV buffer stays within this many bytes; requests
    # wait (or the newest running ones are parked and resume later) while it would not. None: a
    # quarter of the machine's memory. Never less than one request at the full context length.
    kv_cache_bytes: int | None = None
    # Continuous scheduler: read prompts with the model folder's prefill graph (prefill.onnx, see
    # prefill_graph.py) where it has one.
    prefill_graph: bool = True
    # ... and run decode steps of at least this many rows on it too (0: never). Its integer products
    # beat the decoder graph's MatMulNBits when several rows decode together, and lose for a few.
    # Measured, SmolLM2 int8, a decode step at ~120 tokens (direct decoder, 5 alternated rounds),
    # decoder vs prefill graph: 4 rows 10.6 vs 10.8 ms, 6 rows 13.7 vs 12.2, 8 rows 17.7 vs 14.9,
    # 12 rows 21.5 vs 17.9, 16 rows 27.8 vs 22.3. A row's tokens then come from the prefill graph's
    # kernels, whose figures differ from the decoder graph's in the last bits: under such load a
    # greedy answer can differ from the same request's alone (0 keeps answers independent of load).
    prefill_graph_decode_rows: int = 6

    def __post_init__(self) -> None:
        """Refuse a bad option by name: they come from model config too (any JSON a host passes to
        `mlflow.pyfunc.load_model`), where a zero batch size had hung every request and a string a
        thread's traceback."""
        if self.scheduler not in ("auto", "continuous", "genai"):
            raise SlmflowError(f"unknown scheduler {self.scheduler!r}: use auto, continuous or genai")
        least = {"max_batch_size": 1, "max_queue": 1, "join_steps": 0, "prefill_chunk": 16}
        least |= {"prefix_cache_bytes": 0, "prefix_min_tokens": 1, "prefill_graph_decode_rows": 0}
        least |= {"intra_op_threads": 1, "kv_cache_bytes": 1}
        defaulted = ("intra_op_threads", "kv_cache_bytes", "batch_wait_s")  # None: the engine's default
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is None and name in defaulted:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise SlmflowError(f"engine option {name} must be a whole number >= {minimum}; got {value!r}")
        for name in ("batch_wait_s", "max_batch_wait_s"):
            value = getattr(self, name)
            if value is None and name in defaulted:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise SlmflowError(f"engine option {name} must be a number of seconds >= 0; got {value!r}")


@dataclass(eq=False)  # identity: requests are found in the queue by who they are
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = field(default_factory=lambda: next(_ids))
    listener: Callable[[], None] | None = None

    def put(self, kind: str, value: Any) -> None:
        """Queue an event for the caller, then tell its listener (if any) that events are ready."""
        self.events.put((kind, value))
        listener = self.listener
        if listener is not None:
            try:
                listener()
            except Exception:  # a listener's failure is its caller's problem, never the batch's
                log.exception("a token stream listener failed")


class TokenStream:
    """The caller's side of one request: iterate for text deltas, then read `completion`.

    Blocking callers iterate. Event-driven callers (the HTTP server) `listen` instead and `poll`
    when woken: no thread per request, and tokens that arrive while the caller is busy are read in
    one go.
    """

    def __init__(self, request: _Request, withdraw: Callable[[_Request], None]) -> None:
        self._request = request
        self._withdraw = withdraw
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        while self.completion is None:
            text = self._handle(*self._request.events.get())
            if text is None:
                return
            if text:
                yield text

    def listen(self, wake: Callable[[], None]) -> None:
        """Have `wake()` called (on the engine's thread: it must be quick) whenever `poll` has news."""
        self._request.listener = wake
        # Events queued before the listener was set would otherwise go unannounced.
        if not self._request.events.empty():
            wake()

    def poll(self) -> str:
        """The text generated since the last poll, without waiting ('' if none); sets `completion`
        once the generation is done and raises its failure."""
        parts = []
        while self.completion is None:
            try:
                event = self._request.events.get_nowait()
            except queue.Empty:
                break
            text = self._handle(*event)
            if text is None:
                break
            parts.append(text)
        return "".join(parts)

    def cancel(self) -> None:
        """Stop generating: a queued request leaves the queue now, a running one its batch slot at
        the next step."""
        self._request.cancelled.set()
        self._withdraw(self._request)
        # A cancelled request gets no further events: wake a consumer blocked waiting for one.
        self._request.put("cancelled", None)

    def _handle(self, kind: str, value: Any) -> str | None:
        """One event: its text ('' for none), or None once the stream was cancelled."""
        if kind == "text":
            return value
        if kind == "done":
            self.completion = value
            return ""
        if kind == "cancelled":
            return None
        raise value

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


class GenerationEngine:
    """A loaded ONNX Runtime GenAI model, its tokenizer, chat template and scheduler thread."""

    def __init__(self, model_dir: str | Path, options: EngineOptions | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.options = options or EngineOptions()
        config = _read_genai_config(self.model_dir)
        self.context_length: int = int(config["model"].get("context_length") or config["search"]["max_length"])
        self.eos_token_ids: frozenset[int] = frozenset(_as_list(config["model"].get("eos_token_id")))
        self.pad_token_id: int = int(config["model"].get("pad_token_id") or min(self.eos_token_ids, default=0))
        self.defaults = _search_defaults(config.get("search", {}))
        self.chat_template = ChatTemplate.from_model_dir(self.model_dir)
        self._pending: deque[_Request] = deque()
        self._calls: deque[_Call] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.stats = EngineStats()
        self._config = config
        self._genai_model: Any = None
        self._batcher: ContinuousBatcher | None = None
        self._thread = threading.Thread(target=self._owner, name=f"slmflow-engine-{self.model_dir.name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error:
            raise SlmflowError(f"cannot load the ONNX Runtime GenAI model in {self.model_dir}: {self._load_error}")

    # --- caller side (any thread) -------------------------------------------------------------

    def render_chat(self, messages: Any, tools: Tools | None = None) -> str:
        """The prompt for `messages` (and the functions the model may call) in the model's template."""
        if self.chat_template is None:
            raise InvalidRequest("this model has no chat template; send a plain prompt instead", param="messages")
        native = self.chat_template.knows_tools
        prepared = prepare_messages(validate_messages(messages), tools, native=native)
        shown = [f.as_openai() for f in tools.functions] if tools and tools.active and native else None
        return self.chat_template.render(prepared, tools=shown)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return [int(t) for t in self._tokenizer.encode(text)]

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> TokenStream:
        """Queue a generation; raise InvalidRequest or Overloaded at once if it cannot be served."""
        return self.submit_all([(prompt, params)])[0]

    def submit_all(self, generations: Sequence[tuple[str | list[int], SamplingParams | None]]) -> list[TokenStream]:
        """Queue several generations at once, all or none (InvalidRequest or Overloaded otherwise).

        They reach the queue together, so those that may share a batch do, whatever the timing: the
        rows of one `predict` call, the `n` choices of one request.
        """
        requests = []
        for prompt, params in generations:
            prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            requests.append(_Request(prompt_ids, self._resolve(params or SamplingParams(), len(prompt_ids))))
        with self._wakeup:
            if self._closed:
                raise SlmflowError("the model has been unloaded")
            if len(self._pending) + len(requests) > self.options.max_queue:
                raise Overloaded(f"the generation queue is full ({self.options.max_queue} waiting requests)")
            self._pending.extend(requests)
            self.stats.queue_depth = len(self._pending)
            self._wakeup.notify()
        return [TokenStream(request, self._withdraw) for request in requests]

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        return self.submit(prompt, params).result()

    @property
    def scheduler(self) -> str:
        """ "continuous" or "genai": how this engine runs requests (see the module doc)."""
        return "continuous" if self._batcher is not None else "genai"

    def genai_model(self) -> tuple[Any, Any]:
        """(onnxruntime_genai, its Model), loaded on first use; call on the owner thread only (from a
        function given to run_on_owner). The continuous scheduler needs it only for grammars."""
        if self._genai_model is None:
            self._genai_model = self._og.Model(self._genai_config)
        return self._og, self._genai_model

    def run_on_owner(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the owner thread, between steps, and return its result."""
        call = _Call(fn)
        with self._wakeup:
            if self._closed:
                raise SlmflowError("the model has been unloaded")
            self._calls.append(call)
            self._wakeup.notify()
        return call.future.result()

    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens before it) for every token after the first, within the context."""
        return self.score(token_ids).logprobs

    def score(self, token_ids: list[int]) -> Scores:
        """Teacher-forced scores of every token after the first, within the context."""
        if not 2 <= len(token_ids) <= self.context_length:
            raise InvalidRequest(f"scoring needs 2 to {self.context_length} tokens; got {len(token_ids)}")
        return self.run_on_owner(lambda: _score_tokens(self._logit_chunks(token_ids[:-1]), token_ids))

    def _logit_chunks(self, tokens: list[int]) -> Iterator[Any]:
        """Every position's logits for `tokens`, SCORE_CHUNK positions at a time (owner thread)."""
        if self._batcher is not None:
            yield from self._batcher.decoder.logits_in_chunks(tokens, SCORE_CHUNK)
            return
        import numpy as np

        og, model = self.genai_model()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + 1, do_sample=False)
        generator = og.Generator(model, params)
        for start in range(0, len(tokens), SCORE_CHUNK):
            chunk = tokens[start : start + SCORE_CHUNK]
            generator.append_tokens(np.array(chunk, dtype=np.int32))
            logits = np.asarray(generator.get_output("logits"))
            yield logits.reshape(-1, logits.shape[-1])[-len(chunk) :]

    def _withdraw(self, request: _Request) -> None:
        """Take a cancelled request out of the queue, if it is still there: its place is free at once,
        not only once the engine gets to it (a long batch could otherwise leave the queue full of
        requests nobody waits for, refusing new ones)."""
        with self._wakeup:
            if request in self._pending:
                self._pending.remove(request)
                self.stats.queue_depth = len(self._pending)
                self.stats.finished["cancelled"] += 1

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def _resolve(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """Fill unset params from the model's defaults and check the request fits the context."""
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        room = self.context_length - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_length} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        merged = params.merged_over(self.defaults)
        max_tokens = merged.max_tokens or room
        if max_tokens > room:
            raise InvalidRequest(
                f"this model's context is {self.context_length} tokens; the prompt has {prompt_len} and "
                f"max_tokens asks for {max_tokens} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if merged.min_tokens > max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=merged.temperature or 0.0,
            top_p=merged.top_p,
            top_k=merged.top_k,
            stop=merged.stop,
            seed=merged.seed,
            min_tokens=merged.min_tokens,
            guidance=merged.guidance,
        )

    # --- owner thread -----------------------------------------------------------------------

    def _owner(self) -> None:
        try:
            self._load()
        except Exception as e:  # reported to the constructor's caller
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            if self._batcher is not None:
                self._serve_continuous(self._batcher)
            else:
                while (work := self._next_work()) is not None:
                    if isinstance(work, _Call):
                        work.run()
                    elif work:
                        self._run_safely(work)
        except BaseException:
            # A bug here would otherwise leave every caller waiting for an owner that is gone.
            log.exception("the generation engine's owner thread failed; the model is unloaded")
            with self._wakeup:
                self._closed = True
            self._next_work()  # fails whatever still waits
            raise

    def _run_safely(self, batch: list[_Request]) -> None:
        try:
            self._run(batch)
        except Exception as e:
            log.exception("generation failed for %d request(s)", len(batch))
            for request in batch:
                request.put("error", SlmflowError(f"generation failed: {e}"))
            self.stats.finished["error"] += len(batch)

    def _load(self) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(self.model_dir))
        threads = self.options.intra_op_threads or len(os.sched_getaffinity(0))
        # Measured: the default thread pool halves int4 decode speed on small machines.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self._og, self._genai_config = og, config
        self._tokenizer = og.Tokenizer(config)
        self._tokenizer_lock = threading.Lock()
        if self.options.scheduler != "genai":
            try:
                layout, model_file = layout_of(self._config, self.model_dir)
                prefill = self.model_dir / PREFILL_FILE
                use_prefill = self.options.prefill_graph and prefill.is_file()
                decoder = Decoder(
                    model_file,
                    layout,
                    self.options.max_batch_size,
                    threads,
                    self.context_length,
                    prefill_file=prefill if use_prefill else None,
                    prefill_graph_decode_rows=self.options.prefill_graph_decode_rows,
                )
                decoder.max_bytes = self.stats.kv_budget_bytes = self._kv_budget(decoder)
            except UnsupportedGraph as e:
                if self.options.scheduler == "continuous":
                    raise SlmflowError(f"the continuous scheduler cannot run this model: {e}") from None
                log.info("%s runs on ONNX Runtime GenAI Generators: %s", self.model_dir, e)
            else:
                self._batcher = ContinuousBatcher(
                    decoder,
                    PrefixCache(self.options.prefix_cache_bytes, layout.bytes_per_token),
                    eos_token_ids=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    prefill_chunk=self.options.prefill_chunk,
                    prefix_min_tokens=self.options.prefix_min_tokens,
                    stats=self.stats,
                )
        if self._batcher is None:
            self.genai_model()
        wait = self.options.batch_wait_s
        self._batch_wait_s = wait if wait is not None else (0.0 if self._batcher is not None else 0.005)

    def _kv_budget(self, decoder: Decoder) -> int:
        """The KV buffer's limit: as asked (default: a quarter of the machine's memory), but room for
        one request at the full context length at least, so that any request can run alone."""
        asked = self.options.kv_cache_bytes
        if asked is None:
            asked = _memory_bytes() // 4
        lone = decoder.bytes_for(1, self.context_length)
        if asked < lone:
            log.info("KV budget raised from %d to %d bytes: one request at the full context", asked, lone)
        return max(asked, lone)

    # --- continuous scheduler (owner thread) ------------------------------------------------------

    def _serve_continuous(self, batcher: ContinuousBatcher) -> None:
        """Admit what waits into free slots and step, until the engine is closed."""
        while (work := self._next_admission(batcher)) is not None:
            if isinstance(work, _Call):
                work.run()
                continue
            plain = []
            for request in work:
                if request.params.guidance:  # a grammar needs ONNX Runtime GenAI: it runs alone, now
                    self._run_safely([request])
                else:
                    plain.append(_Row(request, self._tokenizer.create_stream(), self.stats))
            if plain:
                if batcher.idle:
                    self.stats.batch_started(len(plain))
                else:
                    self.stats.joined(len(plain), running=self.stats.running + len(plain))
                batcher.admit(plain)
            if not batcher.idle:
                batcher.step()
        batcher.fail_all(SlmflowError("the model has been unloaded"))
        batcher.prefixes.clear()

    def _next_admission(self, batcher: ContinuousBatcher) -> _Call | list[_Request] | None:
        """A call, or the waiting requests that fit the free slots (possibly none: then the running
        rows step on). Waits only when nothing runs. None once the engine is closed."""
        with self._wakeup:
            call = self._await(running=not batcher.idle)
            if call is not None or self._closed:
                return call
            if not self._pending or not batcher.free_slots:
                return []
            if batcher.idle:
                self._gather()
            admitted: list[_Request] = []
            while self._pending and len(admitted) < batcher.free_slots:
                request = self._pending.popleft()
                if request.cancelled.is_set():
                    self.stats.finished["cancelled"] += 1
                else:
                    admitted.append(request)
            self.stats.queue_depth = len(self._pending)
            return admitted

    def _await(self, *, running: bool) -> _Call | None:
        """(Lock held.) Wait for a request or a call, unless rows are `running`; then the call to run
        first, if any. Once the engine is closed, what still waits fails (and None)."""
        while not running and not self._pending and not self._calls and not self._closed:
            self._wakeup.wait()
        if self._closed:
            for request in self._pending:
                request.put("error", SlmflowError("the model has been unloaded"))
            for call in self._calls:
                call.future.set_exception(SlmflowError("the model has been unloaded"))
            self._pending.clear()
            self._calls.clear()
            return None
        return self._calls.popleft() if self._calls else None

    # --- genai scheduler (owner thread) ----------------------------------------------------------

    def _next_work(self) -> _Call | list[_Request] | None:
        """Wait for work: a call, or the oldest request with every waiting one that may share its
        batch (cancelled ones dropped, so possibly empty). None once the engine is closed."""
        with self._wakeup:
            call = self._await(running=False)
            if call is not None or self._closed:
                return call
            self._gather()
            if not self._pending:  # everything that waited was cancelled while it gathered
                return []
            first = self._pending.popleft()
            batch, key = [first], _batch_key(first)
            for request in list(self._pending):
                if len(batch) >= self.options.max_batch_size:
                    break
                if _batch_key(request) == key and self._fits([_span(r) for r in [*batch, request]]):
                    self._pending.remove(request)
                    batch.append(request)
            self.stats.queue_depth = len(self._pending)
            live = [r for r in batch if not r.cancelled.is_set()]
            self.stats.finished["cancelled"] += len(batch) - len(live)
            return live

    def _gather(self) -> None:
        """Give requests sent together a moment to arrive together (called with the lock held).

        A running batch takes new rows only by re-reading its own (see join_steps), so starting on
        the first of eight simultaneous requests would make the other seven wait for it or cost a
        restart: a few milliseconds here is worth a whole generation there. Requests sent together
        reach the queue one by one (the server parses, renders and tokenizes each in turn), so the
        wait goes on while they keep coming.
        """
        if not self._batch_wait_s:
            return
        now = time.monotonic()
        last_arrival, give_up = now, now + self.options.max_batch_wait_s
        waiting = len(self._pending)
        while waiting < self.options.max_batch_size and not self._closed:
            remaining = min(last_arrival + self._batch_wait_s, give_up) - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.wait(remaining)
            if len(self._pending) > waiting:
                last_arrival, waiting = time.monotonic(), len(self._pending)

    def _fits(self, spans: list[tuple[int, int]]) -> bool:
        """Each row's (tokens so far, tokens still to come): a batch's KV buffer spans the longest of
        the first plus the longest of the second, and must fit the context."""
        return max(done for done, _ in spans) + max(to_come for _, to_come in spans) <= self.context_length

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        rows = [_Row(r, self._tokenizer.create_stream(), self.stats) for r in batch]
        everyone = list(rows)
        self.stats.batch_started(len(rows))
        generator = self._start(rows)
        while joiners := self._decode(generator, rows):
            newcomers = [_Row(r, self._tokenizer.create_stream(), self.stats) for r in joiners]
            everyone += newcomers
            rows = [row for row in rows if not row.finished] + newcomers
            self.stats.joined(len(newcomers), running=len(rows))
            generator = self._start(rows)
        self.stats.batch_finished(sum(row.generated for row in everyone))

    def _start(self, rows: list[_Row]) -> Any:
        """A Generator that has read every row's prompt and the tokens it generated so far."""
        import numpy as np

        og, model = self.genai_model()
        contexts = [row.context for row in rows]
        width = max(len(c) for c in contexts)
        params = og.GeneratorParams(model)
        first = rows[0].request.params
        to_come = max(row.to_come for row in rows)
        at_least = max(row.min_to_come for row in rows)
        params.set_search_options(**_search_options(first, len(rows), width, to_come, at_least))
        if first.guidance:  # guided requests run alone and never take newcomers: no restart re-applies it
            params.set_guidance(*first.guidance)
        generator = og.Generator(model, params)
        tokens = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        for index, context in enumerate(contexts):
            tokens[index, : len(context)] = context
        generator.append_tokens(tokens if len(rows) > 1 else tokens[0])
        return generator

    def _decode(self, generator: Any, rows: list[_Row]) -> list[_Request]:
        """Step until every row is finished (then []), or until requests may join (then those)."""
        steps = 0
        while not generator.is_done() and any(not row.finished for row in rows):
            generator.generate_next_token()
            for row, token in zip(rows, generator.get_next_tokens(), strict=True):
                row.step(int(token), self.eos_token_ids)
            steps += 1
            if (
                self._pending
                and steps <= self.options.join_steps
                and (joiners := self._joiners([row for row in rows if not row.finished]))
            ):
                return joiners
        for row in rows:
            row.finish("length")
        return []

    def _joiners(self, live: list[_Row]) -> list[_Request]:
        """Waiting requests that may join these rows (removed from the queue), if joining changes no
        row's output: same batch key, the context fits, and min_tokens keeps its meaning."""
        if not live:
            return []
        # The restarted Generator holds every row back from ending until min_tokens (alike requests
        # share it): a running row must either still need as many, or have to run to max_tokens anyway.
        at_least = live[0].request.params.min_tokens
        if any(row.min_to_come != at_least and row.min_to_come < row.to_come for row in live):
            return []
        key = _batch_key(live[0].request)
        room = self.options.max_batch_size - len(live)
        if room < len(live):  # too few could join for re-reading every running row to pay
            return []
        spans = [(len(row.context), row.to_come) for row in live]
        joiners: list[_Request] = []
        with self._wakeup:
            for request in self._pending:
                if len(joiners) >= room:
                    break
                if request.cancelled.is_set() or _batch_key(request) != key:
                    continue
                if self._fits(spans + [_span(r) for r in [*joiners, request]]):
                    joiners.append(request)
            if len(joiners) < len(live):  # re-reading the running rows would cost more than they gain
                return []
            for request in joiners:
                self._pending.remove(request)
            self.stats.queue_depth = len(self._pending)
        return joiners


class _Row:
    """One request's place in a running batch: detokenizes, applies stop strings, emits events."""

    def __init__(self, request: _Request, stream: Any, stats: EngineStats) -> None:
        self.request = request
        self.stream = stream
        self.stats = stats
        self.stops = StopMatcher(request.params.stop)
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.finished = False
        self.cached_tokens = 0  # of its prompt, found already read (prefix reuse)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def context(self) -> list[int]:
        """What a restarted Generator reads for this row: its prompt and its tokens so far."""
        return self.request.prompt_ids + self.tokens

    @property
    def to_come(self) -> int:
        return (self.request.params.max_tokens or 0) - self.generated

    @property
    def min_to_come(self) -> int:
        return max(self.request.params.min_tokens - self.generated, 0)

    def step(self, token: int, eos: frozenset[int]) -> None:
        if self.finished:
            return
        if self.request.cancelled.is_set():
            self._drop()
            return
        self.tokens.append(token)
        if token in eos:
            self.finish("stop")
            return
        text, stopped = self.stops.feed(self.stream.decode(token))
        self._emit(text)
        if stopped:
            self.finish("stop", flush=False)
        elif self.generated >= (self.request.params.max_tokens or 0):
            self.finish("length")

    def finish(self, reason: FinishReason, *, flush: bool = True) -> None:
        if self.finished:
            return
        if self.request.cancelled.is_set():
            self._drop()
            return
        self.finished = True
        self.stats.finished[reason] += 1
        if flush:
            self._emit(self.stops.flush())
        usage = Usage(len(self.request.prompt_ids), self.generated, self.cached_tokens)
        self.request.put("done", Completion("".join(self.text), reason, usage, tuple(self.tokens)))

    def _drop(self) -> None:
        """Its caller cancelled it: nobody is listening, so it ends without a word."""
        self.finished = True
        self.stats.finished["cancelled"] += 1

    def _emit(self, text: str) -> None:
        if text:
            self.text.append(text)
            self.request.put("text", text)


class _Call:
    """A function to run on the owner thread, with the future its caller waits on."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: Future = Future()

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


@dataclass(frozen=True)
class Scores:
    """Per position after the first: log p(actual token), the token the model ranked first, and its
    log p (how far the actual token is from the top: a near-tie or a clear miss)."""

    logprobs: list[float]
    top_tokens: list[int]
    top_logprobs: list[float]


def _score_tokens(chunks: Iterator[Any], token_ids: list[int]) -> Scores:
    """Teacher-forced log-probabilities from the logits of every position but the last, read in
    chunks, so the logits in memory stay at SCORE_CHUNK x vocabulary (a whole 4k context of a 32k
    vocabulary would be half a gigabyte)."""
    import numpy as np

    logprobs: list[float] = []
    top_tokens: list[int] = []
    top_logprobs: list[float] = []
    start = 0
    for chunk_logits in chunks:
        logits = np.asarray(chunk_logits, dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        following = np.array(token_ids[start + 1 : start + 1 + len(logits)])
        logprobs += (logits[np.arange(len(logits)), following] - log_norm).tolist()
        top_tokens += logits.argmax(axis=1).tolist()
        top_logprobs += (top[:, 0] - log_norm).tolist()
        start += len(logits)
    return Scores(logprobs, top_tokens, top_logprobs)


SCORE_CHUNK = 256


FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class EngineStats:
    """Counters read by the server's /metrics; written only by the owner thread."""

    queue_depth: int = 0
    running: int = 0
    batches: int = 0
    batched_requests: int = 0  # joined ones included
    joined_requests: int = 0  # requests that joined a running batch
    generated_tokens: int = 0
    # Prompt tokens read by the continuous scheduler, and the positions computed to read them (a
    # batched read of prompts computes every row to the longest one's length).
    prompt_tokens: int = 0
    prompt_positions: int = 0
    # Prefix reuse: requests that found a kept prompt's KV or not, prompt tokens not read again, and
    # the bytes of KV kept.
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_cached_tokens: int = 0
    prefix_cache_bytes: int = 0
    kv_slots_bytes: int = 0  # the continuous scheduler's KV buffer
    kv_slots_peak_bytes: int = 0  # ... the largest it has been
    kv_budget_bytes: int = 0  # ... and what it may take
    # Running requests parked to keep the KV buffer within its budget (they resume by reading their
    # prompt and answer so far again).
    parked: int = 0
    # Decode steps run on the prefill graph (EngineOptions.prefill_graph_decode_rows rows or more).
    prefill_graph_decode_steps: int = 0
    # Requests by how they ended: stop, length, cancelled (by their caller, queued or running), error.
    finished: Counter[str] = field(default_factory=Counter)

    def batch_started(self, size: int) -> None:
        self.running = size
        self.batches += 1
        self.batched_requests += size

    def joined(self, size: int, *, running: int) -> None:
        self.running = running
        self.batched_requests += size
        self.joined_requests += size

    def batch_finished(self, tokens: int) -> None:
        self.running = 0
        self.generated_tokens += tokens


def _batch_key(request: _Request) -> tuple:
    """Requests with equal keys may share one batched Generator.

    Search options belong to the whole Generator, so only alike requests can share one. Guided
    requests run alone: ONNX Runtime GenAI 0.18 aborts a batch when one guided row ends. A seeded
    sampled request runs alone: its random stream would otherwise depend on its batch neighbours,
    and the same seed must give the same output.
    """
    p = request.params
    if p.guidance:  # a batched Generator fails once one guided row completes its grammar
        return ("guided", request.number)
    if p.greedy:
        return ("greedy", p.min_tokens)
    if p.seed is not None:
        return ("seeded", request.number)
    return ("sample", p.temperature, p.top_p, p.top_k, p.min_tokens)


def _memory_bytes() -> int:
    """The machine's memory, or the container's limit (cgroup v2) where lower; 16 GiB where the
    system does not say (os.sysconf is POSIX-only)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return memory
    return min(memory, int(limit)) if limit.isdigit() else memory


def _search_options(p: SamplingParams, batch_size: int, width: int, new_tokens: int, at_least: int) -> dict[str, Any]:
    """Every row of a right-padded batch generates from position `width` on."""
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "max_length": width + new_tokens,
        "min_length": width + at_least if at_least else 0,
        "do_sample": not p.greedy,
    }
    if not p.greedy:
        options["temperature"] = p.temperature
        options["top_p"] = p.top_p if p.top_p is not None else 1.0
        options["top_k"] = p.top_k if p.top_k else 0
        if p.seed is not None:
            options["random_seed"] = p.seed
    return options


def _span(request: _Request) -> tuple[int, int]:
    return len(request.prompt_ids), request.params.max_tokens or 0


def _search_defaults(search: dict[str, Any]) -> SamplingParams:
    """The model's own generation defaults (from the checkpoint's generation config)."""
    sampled = bool(search.get("do_sample"))
    return SamplingParams(
        temperature=float(search.get("temperature", 1.0)) if sampled else 0.0,
        top_p=float(search["top_p"]) if sampled and "top_p" in search else None,
        top_k=int(search["top_k"]) if sampled and search.get("top_k") else None,
    )


def _read_genai_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"], config.setdefault("search", {})
        return config
    except (OSError, ValueError, KeyError) as e:
        raise SlmflowError(f"{folder} is not an ONNX Runtime GenAI model: cannot read genai_config.json ({e})") from e


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
