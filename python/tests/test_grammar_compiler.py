"""GrammarCompiler with a fake engine and compiles that block until the test lets
them end: the time limit, exactly one answer, the cap on stuck compiles, cancels held
during a compile, shutdown. No sleeps: the test waits on what the compiler sends."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mlx_serving_runtime import compiler
from mlx_serving_runtime.compiler import GrammarCompiler
from mlx_serving_runtime.protocol import RpcError
from mlx_serving_runtime.request import Request

WAIT = 30.0


class FakeEngine:
    def __init__(self) -> None:
        self.shutting_down = False
        self.calls: list[tuple] = []
        self.got = threading.Event()

    def submit_generate(self, req: Request) -> None:
        self.calls.append(("generate", req.request_id, req.grammar))
        self.got.set()

    def submit(self, *cmd: Any) -> None:
        self.calls.append(cmd)


class Sent:
    def __init__(self) -> None:
        self.msgs: list[dict] = []
        self.cond = threading.Condition()

    def __call__(self, msg: dict) -> None:
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.msgs) >= n, WAIT), self.msgs
            return list(self.msgs)


def request(rid: str, compile_grammar, scope: str = "") -> Request:
    return Request(
        rpc_id=rid + "-rpc",
        request_id=rid,
        model_id="tiny",
        prompt_tokens=[1],
        prefix_len=1,
        continuation="",
        max_tokens=4,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias={},
        logprobs=None,
        seed=1,
        stop=[],
        grammar=None,
        compile_grammar=compile_grammar,
        cache_scope=scope,
    )


def blocked(release: threading.Event, grammar: str = "G"):
    def compile_grammar() -> str:
        assert release.wait(WAIT)
        return grammar

    return compile_grammar


def join_compiles() -> None:
    for t in threading.enumerate():
        if t.name == "grammar-compile":
            t.join(WAIT)
            assert not t.is_alive()


def test_timeout_answers_invalid_schema_once() -> None:
    """Past the limit the generate is answered invalid_schema; the compile's late
    result is dropped (nothing queued, nothing more sent). Mutation caught: the
    timer not started (no answer until the compile ends, then a generate)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=0.01)
    c.submit(request("a", blocked(release)))
    msg = sent.wait_for(1)[0]
    assert msg["id"] == "a-rpc" and msg["error"]["data"]["code"] == "invalid_schema", msg
    assert msg["error"]["message"] == "schema too complex to compile in 0.01 s"
    release.set()
    join_compiles()
    assert eng.calls == [] and len(sent.msgs) == 1
    assert (c._stuck, c._running, c._threads) == ({}, {}, 0)


def test_stuck_compiles_cap_refuses_retryably() -> None:
    """While MAX_STUCK compiles run past their limit, a new compile is refused at once
    with a retryable code; once they end, compiles run again. Mutation caught: the
    cap check removed (the second compile starts)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=0.01, max_stuck=1)
    c.submit(request("a", blocked(release)))
    sent.wait_for(1)
    with pytest.raises(RpcError) as e:
        c.submit(request("b", blocked(release)))
    assert e.value.code == "runtime_busy"
    release.set()
    join_compiles()
    assert c._stuck == {}
    c.limit_s = WAIT
    c.submit(request("c", lambda: "G"))
    assert eng.got.wait(WAIT)
    assert eng.calls == [("generate", "c", "G")]


def test_stuck_budget_is_per_scope() -> None:
    """Red team round 9: one tenant's stuck compiles refused every tenant's. Scope a
    with MAX_STUCK stuck compiles is refused; scope b's compile runs meanwhile.
    Mutation caught: the stuck count summed over scopes (b refused)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=0.01, max_stuck=2)
    c.submit(request("a1", blocked(release), "a"))
    c.submit(request("a2", blocked(release), "a"))
    msgs = sent.wait_for(2)
    assert {m["error"]["data"]["code"] for m in msgs} == {"invalid_schema"}, msgs
    with pytest.raises(RpcError) as e:
        c.submit(request("a3", lambda: "G", "a"))
    assert e.value.code == "runtime_busy" and "this tenant's" in e.value.message
    c.limit_s = WAIT
    c.submit(request("b1", lambda: "G", "b"))
    assert eng.got.wait(WAIT)
    assert eng.calls == [("generate", "b1", "G")]
    release.set()
    join_compiles()
    assert (c._stuck, c._running, c._threads) == ({}, {}, 0)


def test_running_compiles_capped_per_scope_and_in_all() -> None:
    """A scope runs at most max_scope compiles at once, all scopes max_threads: past
    either a new compile is refused with runtime_busy, so neither one tenant nor many
    together start threads without bound; once they end, compiles run again.
    Mutations caught: the scope check removed (a3 starts), the global check removed
    (c1 starts)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=WAIT, max_stuck=2, max_scope=2, max_threads=3)
    c.submit(request("a1", blocked(release), "a"))
    c.submit(request("a2", blocked(release), "a"))
    with pytest.raises(RpcError) as e:
        c.submit(request("a3", blocked(release), "a"))
    assert e.value.code == "runtime_busy" and "2 of this tenant's grammar compiles run" in e.value.message
    c.submit(request("b1", blocked(release), "b"))
    with pytest.raises(RpcError) as e:
        c.submit(request("c1", blocked(release), "c"))
    assert e.value.code == "runtime_busy" and "3 grammar compiles run" in e.value.message
    assert c._threads == 3
    release.set()
    join_compiles()
    assert (c._running, c._threads) == ({}, 0)
    assert sorted(x[1] for x in eng.calls) == ["a1", "a2", "b1"]
    c.submit(request("c2", lambda: "G", "c"))
    join_compiles()
    assert ("generate", "c2", "G") in eng.calls and sent.msgs == []


def test_compiled_request_is_queued_with_its_grammar() -> None:
    eng, sent = FakeEngine(), Sent()
    GrammarCompiler(eng, sent, limit_s=WAIT).submit(request("a", lambda: "GRAMMAR"))
    assert eng.got.wait(WAIT)
    assert eng.calls == [("generate", "a", "GRAMMAR")] and sent.msgs == []


def test_compile_error_answered() -> None:
    eng, sent = FakeEngine(), Sent()

    def bad() -> str:
        raise RpcError("invalid_schema", "json_schema: nope")

    GrammarCompiler(eng, sent, limit_s=WAIT).submit(request("a", bad))
    msg = sent.wait_for(1)[0]
    assert msg["error"]["data"]["code"] == "invalid_schema" and msg["id"] == "a-rpc"
    join_compiles()
    assert eng.calls == []


def test_cancel_during_compile_follows_the_generate() -> None:
    """A cancel for a request still compiling is held and queued right behind its
    generate, so the engine ends it. Mutation caught: hold_cancel returning False
    (the engine would answer the cancel before the generate exists: cancelled false,
    and the generate runs)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=WAIT)
    c.submit(request("a", blocked(release)))
    assert c.hold_cancel("cancel-rpc", "a")
    assert not c.hold_cancel("x", "unknown")
    release.set()
    join_compiles()
    assert eng.calls == [("generate", "a", "G"), ("cancel", "cancel-rpc", "a")]


def test_shutdown_refuses_compiling_requests() -> None:
    """At shutdown a compiling generate is answered shutting_down at once (the engine
    will not run it), and its cancel held is answered too. Mutation caught:
    refuse_pending doing nothing (no answer until the compile ends)."""
    eng, sent, release = FakeEngine(), Sent(), threading.Event()
    c = GrammarCompiler(eng, sent, limit_s=WAIT)
    c.submit(request("a", blocked(release)))
    assert c.hold_cancel("cancel-rpc", "a")
    eng.shutting_down = True
    c.refuse_pending("test")
    msgs = sent.wait_for(2)
    assert msgs[0]["id"] == "a-rpc" and msgs[0]["error"]["data"]["code"] == "shutting_down", msgs
    assert msgs[1] == {
        "jsonrpc": "2.0",
        "id": "cancel-rpc",
        "result": {"request_id": "a", "cancelled": False},
    }
    release.set()
    join_compiles()
    assert eng.calls == [] and len(sent.msgs) == 2


def test_defaults_are_the_documented_constants() -> None:
    c = GrammarCompiler(FakeEngine(), Sent())
    assert (c.limit_s, c._max_stuck, c._stack) == (5.0, 2, 256 << 20)
    assert (c._max_scope, c._max_threads) == (4, 8)
    assert compiler.COMPILE_LIMIT_S == 5.0
