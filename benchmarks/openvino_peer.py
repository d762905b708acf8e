"""OpenVINO GenAI's side of `openvino_bench.py`; runs in the benchmark's own environment.

    benchmarks/.venv-openvino/bin/python benchmarks/openvino_peer.py MODEL_DIR < request.json

Reads the token ids to use (JSON on stdin), measures OpenVINO GenAI on them in process with prefix
caching off, and prints one JSON line of results. Never imported by slmflow: OpenVINO is not one of
its dependencies.
"""

from __future__ import annotations

import json
import math
import sys
import time


def main() -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    folder = sys.argv[1]
    request = json.load(sys.stdin)
    if request.get("only_perplexity"):
        print(json.dumps({"perplexity": perplexity(folder, request["reference"])}), flush=True)
        return
    threads = str(request["threads"])
    properties = {"INFERENCE_NUM_THREADS": threads}
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

    timed_stream(request["short"], 8)  # warm-up: first runs compile
    aggregate(request["batch"][:2], 4)
    first, last, tokens = timed_stream(request["short"], request["decode_tokens"])
    prefill_ttft, _, _ = timed_stream(request["long"], 1)
    out = {
        "decode_tok_s": (tokens - 1) / (last - first),
        "ttft_short_s": first,
        "prefill_tok_s": len(request["long"]) / prefill_ttft,
        "aggregate_tok_s": {str(n): aggregate(request["batch"][:n], request["batch_tokens"]) for n in (8, 16)},
    }
    print(json.dumps(out), flush=True)


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
