"""OpenVINO GenAI's side of `openvino_bench.py`; runs in the benchmark's own environment.

    benchmarks/.venv-openvino/bin/python benchmarks/openvino_peer.py MODEL_DIR

Reads a first JSON line: the token ids to use, or `only_perplexity` with a `reference`. For the
former it loads OpenVINO GenAI's pipelines (prefix caching off), warms them up, prints
{"ready": true, "precision": its CPU execution precision}, then answers one measure per line
({"measure": "stream" | "prefill" | "8" | "16"}) with one JSON line of figures, until its input
ends: the benchmark alternates the systems measure by measure, seconds apart, where a process per
round had them a minute apart on a VM whose speed changes within that. Never imported by slmflow:
OpenVINO is not one of its dependencies.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any


def main() -> None:
    folder = sys.argv[1]
    request = json.loads(sys.stdin.readline())
    if request.get("only_perplexity"):
        print(json.dumps({"perplexity": perplexity(folder, request["reference"])}), flush=True)
        return
    import openvino as ov

    measure = measures(folder, request)
    # Its execution precision follows the CPU (bfloat16 where it has AVX-512 BF16 or AMX): the
    # figures mean little without it.
    precision = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    print(json.dumps({"ready": True, "precision": precision}), flush=True)
    for line in sys.stdin:
        print(json.dumps(measure(json.loads(line)["measure"])), flush=True)


def measures(folder: str, request: dict[str, Any]) -> Callable[[str], dict[str, float]]:
    """A function taking a measure's name to its figures, with the same keys as the benchmark's."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    properties = {"INFERENCE_NUM_THREADS": str(request["threads"])}
    single = genai.LLMPipeline(folder, "CPU", **properties)
    scheduler = genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False
    scheduler.cache_size = 2  # GB of KV blocks: 16 x (100 + 64) tokens need far less
    batched = genai.ContinuousBatchingPipeline(folder, scheduler, "CPU", properties)

    def config(new_tokens: int) -> genai.GenerationConfig:
        c = genai.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = new_tokens
        c.ignore_eos = True
        c.do_sample = False
        return c

    def tensor(ids: list[int]) -> ov.Tensor:
        return ov.Tensor(np.asarray([ids], dtype=np.int64))

    def timed_stream(ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        """(seconds to the first token, seconds to the last, tokens) of one greedy request."""
        times: list[float] = []

        def streamer(_: object) -> genai.StreamingStatus:
            times.append(time.perf_counter())
            return genai.StreamingStatus.RUNNING

        inputs = genai.TokenizedInputs(tensor(ids), ov.Tensor(np.ones((1, len(ids)), dtype=np.int64)))
        started = time.perf_counter()
        single.generate(inputs, config(new_tokens), streamer=streamer)
        return times[0] - started, times[-1] - started, len(times)

    def aggregate(prompts: list[list[int]], new_tokens: int) -> float:
        started = time.perf_counter()
        results = batched.generate([tensor(p) for p in prompts], [config(new_tokens)] * len(prompts))
        seconds = time.perf_counter() - started
        generated = sum(len(r.m_generation_ids[0]) for r in results)
        return generated / seconds

    def measure(name: str) -> dict[str, float]:
        if name == "stream":
            first, last, tokens = timed_stream(request["short"], request["decode_tokens"])
            return {"decode_tok_s": (tokens - 1) / (last - first), "ttft_short_s": first}
        if name == "prefill":
            return {"prefill_tok_s": len(request["long"]) / timed_stream(request["long"], 1)[0]}
        return {f"aggregate_{name}_tok_s": aggregate(request["batch"][: int(name)], request["batch_tokens"])}

    timed_stream(request["short"], 8)  # warm-up: first runs compile
    aggregate(request["batch"][:2], 4)
    return measure


def perplexity(folder: str, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of `ids` after the first, teacher-forced, with Optimum
    Intel's OpenVINO model (the same IR as the pipelines)."""
    import numpy as np
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(folder, device="CPU", compile=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64)).logits
    logits = logits[0, :-1].double().numpy()
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    nll = -(logits[np.arange(len(ids) - 1), ids[1:]] - log_norm)
    return math.exp(float(nll.mean()))


if __name__ == "__main__":
    main()
