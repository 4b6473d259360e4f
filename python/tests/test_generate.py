"""Generation behaviour through the pipe: streaming, batching, seeds, stops, templates, structure."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
from conftest import rid


def gen(rt, **params):
    params.setdefault("model", "tiny")
    params.setdefault("request_id", rid())
    r = rt.call("generate", params)
    assert "result" in r, r
    return r["result"]


def test_stream_matches_result_and_usage(rt) -> None:
    r = rid()
    res = gen(rt, request_id=r, prompt="Hello world", max_tokens=25, temperature=1, seed=7)
    assert res["finish_reason"] == "length"
    chunks = [c.params for c in rt.chunks[r]]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert rt.text_of(r) == res["text"] and res["text"]
    assert chunks[-1]["tokens"] <= 25
    prompt = rt.result("tokenize", {"model": "tiny", "text": "Hello world"})["count"]
    usage = dict(res["usage"])
    assert 0 <= usage.pop("cached_tokens") < prompt  # a shared BOS may come from the prompt cache
    assert usage == {"prompt_tokens": prompt, "completion_tokens": 25, "total_tokens": prompt + 25}
    t = res["timings"]
    assert 0 < t["ttft_ms"] <= t["total_ms"] and t["tokens_per_s"] > 0


def test_max_tokens_capped_by_context(rt) -> None:
    per = (
        rt.result("tokenize", {"model": "tiny", "text": "hello there " * 100, "add_special_tokens": False})[
            "count"
        ]
        / 100
    )
    prompt = "hello there " * int(1990 / per)
    n = rt.result("tokenize", {"model": "tiny", "text": prompt})["count"]
    assert 1900 < n < 2048
    res = gen(rt, prompt=prompt, max_tokens=32768)
    assert res["finish_reason"] == "length"
    assert res["usage"]["total_tokens"] == 2048


def test_no_max_tokens_runs_to_the_end_of_the_context(rt) -> None:
    # EOS (id 2) banned, no stop: an absent max_tokens must run to the context's end
    # (the tiny model's 2048 is under the documented cap of 4096), not to an old fixed 256.
    res = gen(rt, prompt="Once upon a time", logit_bias={"2": -100})
    assert res["finish_reason"] == "length"
    assert res["usage"]["total_tokens"] == 2048, res["usage"]


def test_same_seed_same_text_alone_and_batched(rt) -> None:
    """Mutation caught: sampling.py BatchSampler.__call__ drawing from the global PRNG
    (mx.random.categorical(x * inv) instead of the per-row keys) — red at the second
    alone run. (Before the batched sampler, the per-row make_sampler's global-PRNG and
    mx.random.seed(seed) mutations were red here too.)
    """
    params = dict(prompt="Once upon a time", max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = gen(rt, **params)["text"]
    assert gen(rt, **params)["text"] == alone
    # The same request inside a busy batch, at a different row, joining mid-flight.
    results: dict[str, dict] = {}
    ids = []
    for i in range(5):
        p = (
            dict(params)
            if i == 3
            else dict(prompt=f"other prompt {i}", max_tokens=60, temperature=1.0, seed=i)
        )
        ids.append(rt.request("generate", {"request_id": rid("b"), "model": "tiny", **p}))
    for i in ids:
        results[i] = rt.wait(i)["result"]
    assert results[ids[3]]["text"] == alone
    other = gen(rt, **{**params, "seed": 4321})["text"]
    assert other != alone


def test_eight_concurrent_are_batched(rt) -> None:
    """Mutation caught: engine.py _new_generator with completion_batch_size=1 and
    prefill_batch_size=1 (rows decoded one after another: 1 of 8 spans overlap).
    """
    prompt_counts = {}
    ids = {}
    for i in range(8):
        prompt = "Tell me a story " * (i + 1)
        prompt_counts[i] = rt.result("tokenize", {"model": "tiny", "text": prompt})["count"]
        r = rid("c8")
        ids[i] = (
            r,
            rt.request(
                "generate",
                {
                    "request_id": r,
                    "model": "tiny",
                    "prompt": prompt,
                    "max_tokens": 48,
                    "temperature": 1.0,
                    "seed": 200 + i,  # seeds whose 48 tokens hold no EOS
                },
            ),
        )
    results = {i: rt.wait(rpc)["result"] for i, (_, rpc) in ids.items()}
    for i, res in results.items():
        assert res["finish_reason"] == "length", res
        usage = dict(res["usage"])
        assert 0 <= usage.pop("cached_tokens") < prompt_counts[i]
        assert usage == {
            "prompt_tokens": prompt_counts[i],
            "completion_tokens": 48,
            "total_tokens": prompt_counts[i] + 48,
        }
        assert rt.text_of(ids[i][0]) == res["text"]
    # Batched: every stream was still running when the first one ended.
    spans = [(rt.chunks[r][0].at, rt.chunks[r][-1].at) for r, _ in ids.values()]
    first_end = min(end for _, end in spans)
    assert sum(1 for start, end in spans if start <= first_end <= end) == 8, spans


def test_cancel_mid_stream(rt) -> None:
    """Mutation caught: engine.py Engine._cancel not ending the request (the row runs
    on and finishes "stop"/"length", not "cancelled").
    """
    r = rid("cancel")
    rpc = rt.request(
        "generate",
        {
            "request_id": r,
            "model": "tiny",
            "prompt": "Go on",
            "max_tokens": 2000,
            "temperature": 1.0,
            "seed": 3,
        },
    )
    deadline = time.monotonic() + 30
    while len(rt.chunks.get(r, [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    t0 = time.monotonic()
    c = rt.request("cancel", {"request_id": r})
    res = rt.wait(rpc)["result"]
    elapsed = time.monotonic() - t0
    assert rt.wait(c)["result"] == {"request_id": r, "cancelled": True}
    assert res["finish_reason"] == "cancelled"
    assert elapsed < 1.0
    assert 3 <= res["usage"]["completion_tokens"] < 2000
    assert rt.text_of(r) == res["text"]
    assert rt.result("cancel", {"request_id": r})["cancelled"] is False


def test_cancelled_row_stops_decoding(new_runtime, tiny_model) -> None:
    """A cancel takes the row out of the batch: later steps decode only the rows still read.

    Answering "cancelled" is not enough: a row left in the BatchGenerator decodes on,
    unread, beside every later request until its max_tokens. health.decoded_tokens
    counts what the generators decode (one per row per step), so a lone request of
    N tokens after the cancel must add exactly N.

    Mutation caught: removing BatchGenerator.remove(...) in
    python/mlx_serving_runtime/engine.py (Engine._end, reason "cancelled") makes the
    second request's window count its own tokens plus the cancelled row's.
    """
    rt = new_runtime("--max-batch", "4")
    rt.result("model.load", {"model": tiny_model, "id": "tiny"})
    r = rid("cancel-row")
    rpc = rt.request(
        "generate",
        {
            "request_id": r,
            "model": "tiny",
            "prompt": "Go on",
            "max_tokens": 2000,
            "temperature": 1.0,
            "seed": 3,
        },
    )
    deadline = time.monotonic() + 30
    while len(rt.chunks.get(r, [])) < 3:
        assert time.monotonic() < deadline, "no 3 chunks of the long generate within 30s"
        time.sleep(0.005)
    assert rt.result("cancel", {"request_id": r}) == {"request_id": r, "cancelled": True}
    cancelled = rt.wait(rpc)["result"]
    assert cancelled["finish_reason"] == "cancelled"
    assert cancelled["usage"]["completion_tokens"] < 1000  # plenty left to decode, were it kept

    before = rt.result("health")
    assert before["in_flight"] == 0
    # A lone request now: with the cancelled row gone, every step decodes it alone.
    res = gen(rt, prompt="Hello world", max_tokens=25, temperature=1, seed=7)
    assert res["finish_reason"] == "length" and res["usage"]["completion_tokens"] == 25
    after = rt.result("health")
    assert after["decoded_tokens"] - before["decoded_tokens"] == 25, (before, after)


def test_stop_sequences(rt) -> None:
    """Mutation caught: engine.py _match_stop returning False (finish "length", stop
    text emitted); _holdback returning 0 (a stop's first chars are streamed before
    the match, so the text runs past full[:cut]).
    """
    base = dict(prompt="Hello world", max_tokens=60, temperature=1.0, seed=11)
    full = gen(rt, **base)["text"]
    assert len(full) > 20
    stop = full[12:15]
    cut = full.find(stop)
    r = rid("stop")
    res = gen(rt, request_id=r, **base, stop=["never-there", stop])
    assert res["finish_reason"] == "stop"
    assert res["text"] == full[:cut]
    assert stop not in res["text"] and stop not in rt.text_of(r)
    assert rt.text_of(r) == res["text"]
    assert res["usage"]["completion_tokens"] < 60


def test_stop_matches_across_continuation(rt) -> None:
    base = dict(prompt="Hello world", continuation="abc", max_tokens=30, temperature=1.0, seed=11)
    first = gen(rt, **base)["text"]
    assert first
    # "c" + the first generated char: the match starts inside the continuation, so nothing is sent.
    r = rid("xstop")
    res = gen(rt, request_id=r, **base, stop=["c" + first[0]])
    assert res["finish_reason"] == "stop"
    assert res["text"] == "" and rt.chunks.get(r) is None
    assert res["usage"]["completion_tokens"] < 30


def test_continuation_counts_and_is_not_reemitted(rt) -> None:
    cont = "Once upon a time"
    r = rid("cont")
    res = gen(rt, request_id=r, prompt="Story:", continuation=cont, max_tokens=10, temperature=1.0, seed=2)
    p = rt.result("tokenize", {"model": "tiny", "text": "Story:"})["count"]
    c = rt.result("tokenize", {"model": "tiny", "text": cont, "add_special_tokens": False})["count"]
    # The continuation is fed as prompt but is not prompt: the earlier attempt
    # generated it and the worker counts it as completion (c tokens here).
    assert c > 0
    assert res["usage"]["prompt_tokens"] == p
    assert not res["text"].startswith(cont)
    assert res["usage"]["completion_tokens"] == 10


def test_chat_template_applied(rt) -> None:
    """Mutation caught: request.py request_from_params tokenizing the messages'
    contents joined instead of apply_chat_template's rendering (prompt_tokens differ).
    """
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    res = gen(rt, messages=messages, max_tokens=5)
    rendered = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there!<|end|>\n<|assistant|>\n"
    n = rt.result("tokenize", {"model": "tiny", "text": rendered, "add_special_tokens": False})["count"]
    assert res["usage"]["prompt_tokens"] == n
    plain = rt.result("tokenize", {"model": "tiny", "text": "Be brief.Hi there!"})["count"]
    assert n > plain + 5


SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 1,
                "maxItems": 3,
            },
            "kind": {"type": "string", "enum": ["a", "b"]},
        },
        "required": ["tags", "kind"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_structured_output_validates(rt, name) -> None:
    """Mutation caught: engine.py _start not adding structured.JsonConstraint to the
    row's logits processors (finish "length", text is no JSON).
    """
    schema = SCHEMAS[name]
    ids = [
        rt.request(
            "generate",
            {
                "request_id": rid("json"),
                "model": "tiny",
                "prompt": "JSON please:",
                "max_tokens": 200,
                "temperature": 1.0,
                "seed": s,
                "json_schema": schema,
            },
        )
        for s in range(4)
    ]
    texts = []
    for i in ids:
        res = rt.wait(i)["result"]
        # EOS ends the row once the grammar is complete.
        assert res["finish_reason"] == "stop", res
        doc = json.loads(res["text"])
        jsonschema.validate(doc, schema)
        texts.append(res["text"])
    if name != "enum":
        assert len(set(texts)) > 1  # sampling really varied under the constraint


def test_many_clients_interleave_without_corrupting_lines(rt) -> None:
    # Requests from several threads at once; every line read back is a valid message (checked in conftest).
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            for _ in range(3):
                res = gen(rt, prompt=f"thread {k}", max_tokens=8, temperature=1.0, seed=k)
                assert res["usage"]["completion_tokens"] == 8
                assert rt.result("health")["ok"]
        except AssertionError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not rt.violations
