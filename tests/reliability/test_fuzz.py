"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (Schemathesis + Hypothesis).

Every operation in /openapi.json gets requests generated from its schema: valid ones (positive mode)
and ones that break it (negative mode: wrong types, out-of-range values, missing fields). Each
answer must pass Schemathesis' response checks against the schema (status codes, content types and
bodies as documented: every error is the OpenAI envelope, with exactly its four fields) and ours:
never a 5xx, and a 200 stream is well-formed SSE ending in [DONE]. Then the server must still answer.

The suite fuzzes with a fixed seed, so a commit gets the same verdict on every run (CI cannot turn red
on a case it never met before for a change that did not cause it). `make fuzz` explores: five times
the requests, a new seed each run, printed so that a failure can be replayed with SLMFLOW_FUZZ_SEED.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode

from tests.reliability.conftest import record
from tests.server.conftest import MADRID, SPAIN, LiveServer

# (positive, negative) examples per operation: about 1,060 requests in all, 80 s or so on two cores.
EXAMPLES = {
    ("POST", "/v1/chat/completions"): (330, 130),
    ("POST", "/v1/completions"): (160, 90),
    ("POST", "/invocations"): (230, 120),
    # No parameters: one distinct request each (Hypothesis stops there), and nothing to break.
    ("GET", "/v1/models"): (1, 0),
    ("GET", "/metrics"): (1, 0),
    ("GET", "/health"): (1, 0),
    ("GET", "/ping"): (1, 0),
}
MIN_REQUESTS = 1000
# A deeper run by hand: SLMFLOW_FUZZ_SCALE=5 sends five times as many requests (the floor stays 1,000).
SCALE = float(os.environ.get("SLMFLOW_FUZZ_SCALE", "1"))
# "random": a new seed per run (make fuzz); a number replays a run.
SEED_SETTING = os.environ.get("SLMFLOW_FUZZ_SEED", "20261130")
SEED = random.SystemRandom().randrange(2**32) if SEED_SETTING == "random" else int(SEED_SETTING)
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def check_our_rules(response: schemathesis.Response, stream: bool) -> None:
    """What the issue demands beyond the schema: no 5xx, the envelope on errors, well-formed streams."""
    text = response.content.decode("utf-8", errors="replace")
    assert response.status_code < 500, f"{response.status_code}: {text[:500]}"
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400:
        assert content_type == "application/json", content_type
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert "Traceback" not in body["error"]["message"]
    elif content_type.startswith("text/event-stream"):
        assert stream, "an event stream nobody asked for"
        events = [event for event in text.split("\n\n") if event]
        assert events and events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            assert event.startswith("data: "), event
            payload = json.loads(event.removeprefix("data: "))
            assert "error" not in payload, payload  # a stream that failed after its 200


@pytest.mark.timeout(480 * max(SCALE, 1))
def test_fuzz_the_api_from_its_openapi_schema(fuzz_server: LiveServer) -> None:
    print(f"fuzzing with SLMFLOW_FUZZ_SEED={SEED}")
    raw = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=10).json()
    # Failures show the request as sent: no "[Filtered]" over fields named like max_tokens.
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_dict(raw, config=config)
    session = requests.Session()
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    def run(operation: Any, mode: GenerationMode, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,  # no .hypothesis folder in the repo
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        @seed(SEED)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
            sent[f"{case.method} {case.path} {mode.value}"] += 1
            statuses[response.status_code] += 1
            stream = isinstance(case.body, dict) and case.body.get("stream") is True
            check_our_rules(response, stream)
            case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)

        fuzz()

    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {(op.method.upper(), op.path) for op in operations}
    assert labels == set(EXAMPLES), f"operations in the schema changed: {sorted(labels)}"
    for operation in operations:
        positive, negative = (round(n * SCALE) for n in EXAMPLES[(operation.method.upper(), operation.path)])
        run(operation, GenerationMode.POSITIVE, positive)
        if negative:
            run(operation, GenerationMode.NEGATIVE, negative)

    total = sum(sent.values())
    seconds = time.monotonic() - started
    # Alive and unharmed: a known greedy request still gets its known answer.
    answer = fuzz_server.client().chat.completions.create(model="tiny", messages=SPAIN, max_tokens=4)
    assert MADRID.startswith(answer.choices[0].message.content)
    assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200
    record(
        "fuzz",
        requests_sent=total,
        by_operation=dict(sorted(sent.items())),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        server_errors=sum(v for k, v in statuses.items() if k >= 500),
        seconds=round(seconds, 1),
        seed=SEED,
    )
    assert total >= MIN_REQUESTS, f"only {total} requests were generated"
    assert not any(status >= 500 for status in statuses)


# Schema-valid requests may still be refused (400) for what a JSON schema cannot say: min_tokens over
# max_tokens, a prompt over the context, a JSON schema the guidance engine cannot compile, text the
# tokenizer cannot encode. So "positive data is accepted" does not hold; every other check does.
EXCLUDED_CHECKS: list[Any] = [schemathesis.checks.positive_data_acceptance]
