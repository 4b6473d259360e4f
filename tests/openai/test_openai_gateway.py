"""The OpenAI-compatible gateway, driven by the official openai client against a
real `mlx-serving up`."""

from __future__ import annotations

import http.client
import json
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
    r = client.chat.completions.create(
        model=up.model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=12
    )
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
    def once():
        return client.chat.completions.create(
            model=up.model, messages=[{"role": "user", "content": "seeded"}], max_tokens=12,
            temperature=1.0, seed=1234,
        ).choices[0].message.content

    assert once() == once()


def test_stop_sequence_is_never_emitted(client, up):
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
    r = client.chat.completions.create(
        model=up.model,
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=200,
        temperature=0.8,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_bad_input_is_400_naming_the_field(client, up):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=up.model, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert "temperature" in str(e.value)


def test_unknown_model_is_503(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503


def post(up_http: str, path: str, body: dict) -> http.client.HTTPResponse:
    host, port = up_http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1" + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn.getresponse()


def test_client_disconnect_cancels_the_job(up):
    """A streaming client that goes away cancels its job: the durable result says cancelled."""
    # Sampled, so the tiny model writes printable text that streams token by token
    # (greedy decoding of random weights can loop on bytes that never form UTF-8).
    body = {"model": up.model, "messages": [{"role": "user", "content": "long"}], "max_tokens": 8000,
            "temperature": 1.0, "seed": 7, "stream": True}
    r = post(up.http, "/chat/completions", body)
    assert r.status == 200
    job_id = r.getheader("x-mlx-job-id")
    while True:
        line = r.fp.readline().decode()
        if line.startswith("data: ") and '"content"' in line:
            break
    r.close()  # the client goes away mid-stream
    assert job_id, "gateway should name the job in X-Mlx-Job-Id"

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = subprocess.run([str(up.binary), "result", "--json", "--nats", up.nats_url, job_id], capture_output=True, text=True, check=False)
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
        statuses: list[int] = []
        retry_after: list[str] = []

        def hit():
            try:
                r = post(u.http, "/completions", body)
            except OSError:
                return
            statuses.append(r.status)
            if r.status == 429:
                retry_after.append(r.getheader("retry-after") or "")
                payload = json.loads(r.read())
                assert payload["error"]["code"] == "queue_full", payload

        threads = [threading.Thread(target=hit, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 429 not in statuses:
            time.sleep(0.05)
        assert 429 in statuses, statuses
        assert retry_after and retry_after[0].isdigit()
    finally:
        u.proc.kill()
        u.proc.wait()
