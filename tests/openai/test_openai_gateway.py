"""The OpenAI-compatible gateway, driven by the official openai client against a
real `mlx-serving up`."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import threading
import time

import jsonschema
import openai
import pytest


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_fleet(client, up):
    ids = [m.id for m in client.models.list().data]
    assert up.model in ids


def test_chat_non_streaming_has_text_and_usage(client, up):
    """Usage counts the prompt as the model's chat template renders it: as many prompt
    tokens as a completion of the rendered text (it starts with BOS, so none is added).

    Mutation caught: python/mlx_serving_runtime/engine.py request_from_params, tokenizing
    the messages' contents joined instead of apply_chat_template's rendering.
    """
    r = client.chat.completions.create(
        model=up.model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=12
    )
    rendered = "<s><|user|>\nSay hello<|end|>\n<|assistant|>\n"  # the tiny model's template
    same = client.completions.create(model=up.model, prompt=rendered, max_tokens=1)
    assert r.usage.prompt_tokens == same.usage.prompt_tokens, (r.usage, same.usage)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client, up):
    stream = client.chat.completions.create(
        model=up.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions(client, up):
    r = client.completions.create(model=up.model, prompt="Once upon a time", max_tokens=8)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert 0 < r.usage.completion_tokens <= 8


def test_seed_makes_sampling_repeatable(client, up):
    """Mutation caught: python/mlx_serving_runtime/engine.py make_sampler drawing from the
    global PRNG (mx.random.categorical without key=sub)."""
    def once():
        return client.chat.completions.create(
            model=up.model, messages=[{"role": "user", "content": "seeded"}], max_tokens=12,
            temperature=1.0, seed=1234,
        ).choices[0].message.content

    assert once() == once()


def test_stop_sequence_is_never_emitted(client, up):
    """Mutation caught: engine.py _match_stop returning False (the stop is emitted, finish
    "length"); _holdback returning 0 (the stop's first char is streamed before the match)."""
    free = client.completions.create(model=up.model, prompt="stop test", max_tokens=24).choices[0].text
    assert len(free) > 4
    stop = free[2:4]
    r = client.completions.create(model=up.model, prompt="stop test", max_tokens=24, stop=[stop])
    assert stop not in r.choices[0].text
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_structured_output_validates(client, up, seed):
    """Mutation caught: engine.py _start not adding structured.JsonConstraint (no JSON)."""
    r = client.chat.completions.create(
        model=up.model,
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=200,
        temperature=0.8,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_schema_admitting_no_value_is_400_invalid_schema(client, up):
    """Red team rt7: {"$ref": "#"} was 500 generation_failed with llguidance's parser
    state in the message. Mutation caught: structured.compile_schema without its
    first-mask probe (500)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=up.model,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
        )
    assert e.value.code == "invalid_schema", e.value
    assert e.value.body["message"] == "json_schema: no JSON value satisfies the schema", e.value.body


def test_bad_input_is_400_naming_the_field(client, up):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=up.model, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert "temperature" in str(e.value)


def test_unknown_model_is_404(client):
    """A model no worker announced is NotFoundError, which the client does not retry.

    Mutation caught: gateway/jobs.go answering an unknown model with 503 model_not_available.
    """
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and e.value.param == "model", e.value.body


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"store": True}, "store", "unsupported_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),  # needs logprobs=True
        ({"n": 9}, "n", "invalid_value"),
        ({"service_tier": "auto"}, "service_tier", "unsupported_parameter"),
        ({"extra_body": {"temprature": 0.5}}, "temprature", "unknown_parameter"),
    ],
)
def test_unimplemented_fields_are_refused_naming_them(client, up, kwargs, param, code):
    """Nothing sent is silently ignored.

    Mutation caught: gateway/fields.go fieldSet.check returning nil at once.
    """
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=up.model, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs)
    assert (e.value.param, e.value.code) == (param, code), e.value.body


def test_logprobs_penalties_bias_and_n_through_the_official_client(client, up):
    """logprobs (chat and completions, streamed and not) and logit_bias reach the runtime
    and come back in OpenAI's shapes; the penalties are accepted and run; n=2 gives two
    indexed choices."""
    msgs = [{"role": "user", "content": "Count to ten"}]
    r = client.chat.completions.create(model=up.model, messages=msgs, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, frequency_penalty=1.5, presence_penalty=0.5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob <= 0 and e.bytes is not None for e in content)
    streamed = []
    for chunk in client.chat.completions.create(model=up.model, messages=msgs, max_tokens=5, temperature=0,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert 0 < len(streamed) <= 5
    forced = client.chat.completions.create(model=up.model, messages=msgs, max_tokens=4, logprobs=True,
                                            logit_bias={"65": 100}).choices[0].logprobs.content
    assert len({e.token for e in forced}) == 1 and all(e.logprob > -0.01 for e in forced)
    c = client.completions.create(model=up.model, prompt="One two", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == c.usage.completion_tokens
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    two = client.chat.completions.create(model=up.model, messages=msgs, max_tokens=4, n=2, seed=3, temperature=1)
    assert [c.index for c in two.choices] == [0, 1]
    # The prompt counts once; the completions of both choices add up.
    assert two.usage.prompt_tokens == r.usage.prompt_tokens and 2 <= two.usage.completion_tokens <= 8
    finished = {}
    for chunk in client.chat.completions.create(model=up.model, messages=msgs, max_tokens=4, n=2, stream=True):
        for ch in chunk.choices:
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert sorted(finished) == [0, 1]


def test_no_op_values_of_unimplemented_fields_are_accepted(client, up):
    r = client.chat.completions.create(
        model=up.model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
        n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, logit_bias={}, store=False,
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_health_ready_and_cors(up):
    """/healthz and /readyz are 200 with a serving worker; the origin given to up with
    --cors-origins may call from a browser, another may not.

    Mutation caught: cmd/mlx-serving/services.go not passing cors_origins to the gateway.
    """
    host, port = up.http.rsplit(":", 1)

    def request(method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r

    for path in ("/healthz", "/readyz"):
        assert request("GET", path, {}).status == 200, path
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    r = request("OPTIONS", "/v1/chat/completions", {"Origin": up.cors_origin, **ask})
    assert r.status == 204 and r.getheader("access-control-allow-origin") == up.cors_origin, r.getheaders()
    assert "authorization" in r.getheader("access-control-allow-headers").lower(), r.getheaders()
    r = request("OPTIONS", "/v1/chat/completions", {"Origin": "https://other.example", **ask})
    assert r.getheader("access-control-allow-origin") is None, r.getheaders()


def post(up_http: str, path: str, body: dict) -> tuple[socket.socket, http.client.HTTPResponse]:
    """The response and its socket (kept here: the connection drops its own when the
    response is to close the connection)."""
    host, port = up_http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1" + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    sock = conn.sock
    return sock, conn.getresponse()


def readline_until(sock: socket.socket, r: http.client.HTTPResponse, want, timeout: float) -> str:
    """The first line of r's body for which want(line) holds; the test fails, naming the
    last lines read, when the body ends or the deadline passes first."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no wanted line within {timeout:.0f}s; last lines: {seen[-5:]}")
        sock.settimeout(left)  # each read is bounded by what is left of the deadline
        try:
            raw = r.fp.readline()
        except TimeoutError:
            pytest.fail(f"no wanted line within {timeout:.0f}s; last lines: {seen[-5:]}")
        if not raw:
            pytest.fail(f"stream ended before the wanted line; last lines: {seen[-5:]}")
        line = raw.decode()
        seen.append(line)
        if want(line):
            return line


def test_client_disconnect_cancels_the_job(up):
    """A streaming client that goes away cancels its job: the durable result says cancelled."""
    # Sampled, so the tiny model writes printable text that streams token by token
    # (greedy decoding of random weights can loop on bytes that never form UTF-8).
    body = {"model": up.model, "messages": [{"role": "user", "content": "long"}], "max_tokens": 8000,
            "temperature": 1.0, "seed": 7, "stream": True}
    sock, r = post(up.http, "/chat/completions", body)
    assert r.status == 200
    job_id = r.getheader("x-mlx-job-id")
    readline_until(sock, r, lambda line: line.startswith("data: ") and '"content"' in line, timeout=60)
    r.close()  # the client goes away mid-stream
    sock.close()
    assert job_id, "gateway should name the job in X-Mlx-Job-Id"

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = subprocess.run([str(up.binary), "result", "--json", "--nats", up.nats_url, job_id],
                           capture_output=True, text=True, check=False, timeout=30)
        if p.returncode == 0:
            res = json.loads(p.stdout)
            assert res["status"] == "cancelled", res
            assert res["usage"]["completion_tokens"] < 8000
            return
        time.sleep(0.2)
    pytest.fail("no terminal result after the client disconnected")


def test_queue_full_is_429_with_retry_after(binary, tmp_path):
    """With a queue of 1 and one slot, concurrent long requests overflow: 429 with Retry-After."""
    from conftest import Up

    u = Up(binary, tmp_path, ["--jobs-max-msgs", "1", "--slots", "1", "--batch-max-size", "1"])
    try:
        body = {"model": u.model, "prompt": "fill", "max_tokens": 4000}
        # Each request thread reports what it got here; only this thread asserts on it
        # (an assertion in a request thread would not fail the test).
        outcomes: queue.Queue[tuple] = queue.Queue()

        def hit():
            try:
                _, r = post(u.http, "/completions", body)
                if r.status != 429:
                    outcomes.put(("status", r.status, None, None))
                    return
                outcomes.put(("status", 429, r.getheader("retry-after"), r.read()))
            except Exception as e:  # noqa: BLE001 — handed to the test thread, which asserts
                outcomes.put(("error", e))

        for _ in range(8):
            threading.Thread(target=hit, daemon=True).start()
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        got: list[tuple] = []
        while not any(o[0] == "status" and o[1] == 429 for o in got):
            left = deadline - time.monotonic()
            try:
                got.append(outcomes.get(timeout=max(left, 0)))
            except queue.Empty:
                pytest.fail(f"no 429 within 60s; responses so far: {got}")
        errors = [o[1] for o in got if o[0] == "error"]
        assert not errors, f"requests failed before the 429: {errors!r}"
        _, _, retry_after, payload = next(o for o in got if o[0] == "status" and o[1] == 429)
        assert retry_after and retry_after.isdigit(), retry_after
        assert json.loads(payload)["error"]["code"] == "queue_full", payload
    finally:
        u.proc.kill()
        u.proc.wait()
