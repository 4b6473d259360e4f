"""Generate preparation off the reader thread (preparer.py, red team round 11 F2):
handle() drives a Preparer over a fake engine, with request_from_params replaced by
one that blocks until the test lets it end. The reader (the test thread calling
handle) answers health at once meanwhile; a cancel or a shutdown that comes while a
generate is queued or being prepared gives exactly one answer for each request; a
preparation that fails answers its request only. No sleeps: the test waits on events
and on what is sent."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from conftest import rid
from test_grammar_compiler import WAIT, Sent, request

from mlx_serving_runtime import preparer as preparer_mod
from mlx_serving_runtime import request as request_mod
from mlx_serving_runtime.__main__ import handle
from mlx_serving_runtime.preparer import Preparer
from mlx_serving_runtime.protocol import RpcError


class FakeCache:
    def stats(self) -> dict[str, int]:
        return {"entries": 0, "bytes": 0, "max_bytes": 0, "hits": 0, "hit_tokens": 0, "prompt_tokens": 0}


class FakeEngine:
    """What handle() and the Preparer use of the engine. A cancel behaves as the
    engine's: a generate queued before it ends cancelled (answered with its result),
    else the cancel answers cancelled: false."""

    def __init__(self, send: Sent) -> None:
        self.send = send
        self.shutting_down = False
        self.calls: list[tuple] = []
        self.calls_cond = threading.Condition()  # notified on every call
        self.prompt_cache = FakeCache()
        self._queued: dict[str, Any] = {}

    def in_flight(self) -> int:
        return len(self._queued)

    def decoded_tokens(self) -> int:
        return 0

    def model_ids(self) -> list[str]:
        return ["tiny"]

    def _call(self, call: tuple) -> None:
        with self.calls_cond:
            self.calls.append(call)
            self.calls_cond.notify_all()

    def wait_calls(self, pred: Any) -> bool:
        """Wait until pred(calls) holds (False after WAIT)."""
        with self.calls_cond:
            return self.calls_cond.wait_for(lambda: pred(list(self.calls)), WAIT)

    def submit_generate(self, req: Any) -> None:
        self._queued[req.request_id] = req
        self._call(("generate", req.request_id))

    def submit(self, *cmd: Any) -> None:
        self._call(cmd)
        if cmd[0] == "cancel":
            req = self._queued.pop(cmd[2], None)
            if req is not None:
                self.send({"jsonrpc": "2.0", "id": req.rpc_id, "result": {"finish_reason": "cancelled"}})
            self.send(
                {
                    "jsonrpc": "2.0",
                    "id": cmd[1],
                    "result": {"request_id": cmd[2], "cancelled": req is not None},
                }
            )


class Writer:
    def __init__(self, sent: Sent) -> None:
        self.send = sent


class Prep:
    """Stands in for request_from_params: each request_id's preparation blocks on its
    own release event (signalling `entered` first), or raises what fail[rid] holds."""

    def __init__(self) -> None:
        self.entered: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}
        self.fail: dict[str, BaseException] = {}

    def block(self, rid: str) -> None:
        self.entered[rid], self.release[rid] = threading.Event(), threading.Event()

    def __call__(self, engine: Any, rpc_id: Any, params: dict[str, Any]) -> Any:
        rid = params["request_id"]
        if rid in self.release:
            self.entered[rid].set()
            assert self.release[rid].wait(WAIT), f"{rid} never released"
        if rid in self.fail:
            raise self.fail[rid]
        req = request(rid, None)
        assert req.rpc_id == rpc_id
        return req


@pytest.fixture(params=[1])
def rig(monkeypatch, request):
    """The Preparer over a fake engine, with request.param preparation threads (1
    unless a test asks for more: most tests here pin down what one thread does)."""
    prep = Prep()
    # Both homes: the preparer's, and the one handle() reads when it prepares itself.
    monkeypatch.setattr(preparer_mod, "request_from_params", prep)
    monkeypatch.setattr(request_mod, "request_from_params", prep)
    sent = Sent()
    eng = FakeEngine(sent)
    p = Preparer(eng, sent, compiler=None, stack_bytes=1 << 20, threads=request.param)
    writer = Writer(sent)

    def line(method: str, rpc_id: Any, params: dict[str, Any]) -> None:
        msg = {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}
        handle(eng, writer, json.dumps(msg).encode(), None, p)

    def generate(rid: str, scope: str = "") -> None:
        params = {"request_id": rid, "model": "tiny", "prompt": "x"}
        if scope:
            params["cache_scope"] = scope
        line("generate", rid + "-rpc", params)

    yield prep, sent, eng, p, line, generate
    for ev in prep.release.values():
        ev.set()
    p.close(WAIT)


def answers(sent: Sent, rpc_id: Any) -> list[dict]:
    with sent.cond:
        return [m for m in sent.msgs if m.get("id") == rpc_id]


def test_health_answered_while_a_generate_is_prepared(rig) -> None:
    """F2: a long prompt's tokenizing held up the worker's health past its timeout.
    While a preparation blocks, health is answered by handle() itself, before the
    generate is. Mutation caught: handle() preparing on the reader again (`if
    preparer is not None` made false: the generate line blocks handle until the
    preparation gives up, and the generate is answered before health)."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    line("health", "h", {})
    with sent.cond:
        assert [m["id"] for m in sent.msgs] == ["h"], sent.msgs
    assert sent.msgs[0]["result"]["ok"] is True
    assert eng.calls == []
    prep.release["a"].set()
    p.close(WAIT)
    assert eng.calls == [("generate", "a")] and len(sent.msgs) == 1


def test_generate_params_are_checked_off_the_reader(rig, monkeypatch) -> None:
    """A generate's params schema check runs on a preparer thread: while it runs
    (here held), the reader answers health at once; and params that fail it are
    answered invalid_params with their violations, as the reader answered them.
    Round 16 F1: 0.5-0.95 s per valid job of 12,800 tool calls, eight of them held
    health past the worker's 5 s timeout and the runtime was restarted. Mutation
    caught: handle() checking the params on the reader (health waits)."""
    from mlx_serving_runtime import validation

    prep, sent, eng, p, line, generate = rig
    entered, release = threading.Event(), threading.Event()
    real = validation.violations

    def held(type_name: str, doc: Any) -> list:
        if type_name == "runtime.generate.params" and doc.get("request_id") == "slow":
            entered.set()
            assert release.wait(WAIT)
        return real(type_name, doc)

    monkeypatch.setattr(validation, "violations", held)
    generate("slow")  # the test thread is the reader: with the check here it would block
    assert entered.wait(WAIT)
    line("health", "h", {})
    got = sent.wait_for(1)[0]
    assert got["id"] == "h" and got["result"]["ok"], got
    release.set()
    line("generate", "bad-rpc", {"request_id": "bad", "model": "tiny", "prompt": "x", "max_tokens": "many"})
    bad = sent.wait_for(2)[1]
    assert bad["id"] == "bad-rpc" and bad["error"]["data"]["code"] == "invalid_params", bad
    assert any(v["path"] == "$.max_tokens" for v in bad["error"]["data"]["violations"]), bad


def test_cancel_during_preparation_ends_it_cancelled(rig) -> None:
    """A cancel for a generate still being prepared is held and passed to the engine
    right behind it: the generate ends cancelled, one answer each. A cancel for one
    still queued behind it too. Mutation caught: hold_cancel returning False (the
    engine answers the cancel cancelled: false before the generate exists, and the
    generate runs on unanswered)."""
    prep, sent, eng, _, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    generate("b")  # queued behind a
    line("cancel", "ca", {"request_id": "a"})
    line("cancel", "cb", {"request_id": "b"})
    with sent.cond:
        assert sent.msgs == [], sent.msgs
    prep.release["a"].set()
    sent.wait_for(4)
    for r in ("a", "b"):
        assert answers(sent, r + "-rpc") == [
            {"jsonrpc": "2.0", "id": r + "-rpc", "result": {"finish_reason": "cancelled"}}
        ], sent.msgs
        assert answers(sent, "c" + r) == [
            {"jsonrpc": "2.0", "id": "c" + r, "result": {"request_id": r, "cancelled": True}}
        ], sent.msgs
    assert eng.calls == [
        ("generate", "a"),
        ("cancel", "ca", "a"),
        ("generate", "b"),
        ("cancel", "cb", "b"),
    ]


def test_shutdown_refuses_queued_and_preparing_requests_once(rig) -> None:
    """A cancel-mode shutdown answers a generate queued for preparation, the one
    being prepared (and a cancel held for one) and a command queued behind them with
    shutting_down at once, and nothing is handed to the engine after: one answer
    each. Mutation caught: refuse_pending doing nothing (no answer until the
    preparation ends; then a and b are handed on behind the engine's shutdown)."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    generate("b")
    line("cancel", "cb", {"request_id": "b"})
    line("model.unload", "u", {"id": "tiny"})
    line("shutdown", "s", {"mode": "cancel"})
    with sent.cond:  # answered by handle() itself, before a's preparation ends
        got = {m["id"]: m for m in sent.msgs}
    assert set(got) == {"a-rpc", "b-rpc", "cb", "u"}, sent.msgs
    for rpc_id in ("a-rpc", "b-rpc", "u"):
        assert got[rpc_id]["error"]["data"]["code"] == "shutting_down", got
    assert got["cb"]["result"] == {"request_id": "b", "cancelled": False}
    prep.release["a"].set()
    p.close(WAIT)
    assert len(sent.msgs) == 4, sent.msgs
    assert eng.calls == [("shutdown", "s", "cancel")]


def test_drain_shutdown_and_unload_follow_the_generates_sent_before(rig) -> None:
    """The engine sees commands in the order they were sent: an unload and a drain
    shutdown sent while generates are prepared reach it behind them (the unload
    cancels them, the drain runs them, as before the preparer), and a generate sent
    after the drain is refused. Mutation caught: handle() submitting unload and
    shutdown to the engine at once (in_order calling run() whatever the preparer):
    the engine gets them first."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    generate("b")
    line("model.unload", "u", {"id": "tiny"})
    line("shutdown", "s", {"mode": "drain"})
    generate("c")
    msg = sent.wait_for(1)[0]
    assert msg["id"] == "c-rpc" and msg["error"]["data"]["code"] == "shutting_down", msg
    assert eng.calls == []
    prep.release["a"].set()
    p.close(WAIT)
    assert eng.calls == [
        ("generate", "a"),
        ("generate", "b"),
        ("unload", "u", "tiny"),
        ("shutdown", "s", "drain"),
    ]
    assert len(sent.msgs) == 1, sent.msgs


@pytest.mark.parametrize("rig", [2], indirect=True)
def test_slow_preparation_holds_up_no_other_generate(rig) -> None:
    """With two threads a generate whose preparation is slow (a long document)
    does not hold up another tenant's sent after it, and commands still wait for every
    generate sent before them: the unload reaches the engine only once the slow one
    is handed on, and a generate sent after it only after it. Mutation caught: one
    thread (b waits for a). (That a command waits for the active set is pinned by
    test_a_command_waits_for_what_is_prepared: here the threads' timing decides.)"""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    prep.block("c")
    generate("a", "t1")
    assert prep.entered["a"].wait(WAIT)
    generate("b", "t2")
    assert eng.wait_calls(lambda calls: ("generate", "b") in calls), eng.calls
    line("model.unload", "u", {"id": "tiny"})
    generate("c", "t2")
    assert not prep.entered["c"].is_set()  # c waits behind the unload, which waits for a
    assert eng.calls == [("generate", "b")]
    prep.release["a"].set()
    assert prep.entered["c"].wait(WAIT)
    prep.release["c"].set()
    p.close(WAIT)
    assert eng.calls == [("generate", "b"), ("generate", "a"), ("unload", "u", "tiny"), ("generate", "c")]


def test_a_command_waits_for_what_is_prepared(rig) -> None:
    """_pick, read under the lock while the one thread prepares a: an unload sent
    after a is not taken (nor the generate behind it) until a is settled.
    Mutation caught: _pick taking a command at the head whatever is active (the
    unload is picked while a is prepared)."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    line("model.unload", "u", {"id": "tiny"})
    generate("b", "t2")
    with p._cond:
        assert p._pick() is None
    prep.release["a"].set()
    p.close(WAIT)
    assert eng.calls == [("generate", "a"), ("unload", "u", "tiny"), ("generate", "b")]


def test_nothing_is_taken_while_a_command_runs(rig) -> None:
    """_pick, read under the lock: while a command is taken (its thread about to run
    it), a generate sent after it is not taken by another thread, which could hand it
    on first. Mutation caught: _pick without its check of the active commands."""
    from mlx_serving_runtime.preparer import _Command, _Item

    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)  # the one thread is busy with a
    cmd = _Command("u", lambda: None)
    later = _Item("c-rpc", {"request_id": "c", "model": "tiny", "prompt": "x", "cache_scope": "t2"})
    with p._cond:
        p._active.add(cmd)
        p._queue.append(later)
        try:
            assert p._pick() is None
        finally:
            p._active.discard(cmd)
            p._queue.remove(later)
    prep.release["a"].set()


@pytest.mark.parametrize("rig", [2], indirect=True)
def test_one_tenant_takes_at_most_half_the_threads(rig) -> None:
    """Two threads, one per tenant at most: while tenant t1's long preparation runs,
    its next generate waits and tenant t2's, sent after it, is taken past it.
    Mutation caught: _take without the per-scope share (a2 takes the second
    thread first and b waits behind both)."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    prep.block("a2")
    generate("a", "t1")
    assert prep.entered["a"].wait(WAIT)
    generate("a2", "t1")
    generate("b", "t2")
    assert eng.wait_calls(lambda calls: ("generate", "b") in calls), eng.calls
    assert not prep.entered["a2"].is_set()  # t1 holds its one thread with a
    prep.release["a"].set()
    assert prep.entered["a2"].wait(WAIT)
    prep.release["a2"].set()
    p.close(WAIT)
    assert eng.calls == [("generate", "b"), ("generate", "a"), ("generate", "a2")]


@pytest.mark.parametrize(
    "exc, code",
    [
        (RpcError("context_exceeded", "prompt has 9 tokens, the context is 8"), "context_exceeded"),
        (RecursionError(), "invalid_params"),
        (KeyError("boom"), "generation_failed"),
    ],
)
def test_failed_preparation_answers_that_request_only(rig, exc: BaseException, code: str) -> None:
    """A preparation that raises answers its generate with the error (and a cancel
    held for it cancelled: false); the thread lives and the next generate is handed
    on. Mutations caught: _prepare's except narrowed to RpcError (the RecursionError
    reaches the thread's net: generation_failed, not invalid_params); that and the
    net narrowed too (RecursionError and KeyError end the thread: a gets no answer,
    b is never handed on)."""
    prep, sent, eng, p, line, generate = rig
    prep.block("a")
    prep.fail["a"] = exc
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    line("cancel", "ca", {"request_id": "a"})
    generate("b")
    prep.release["a"].set()
    msgs = sent.wait_for(2)
    assert msgs[0]["id"] == "a-rpc" and msgs[0]["error"]["data"]["code"] == code, msgs
    assert msgs[1] == {"jsonrpc": "2.0", "id": "ca", "result": {"request_id": "a", "cancelled": False}}
    p.close(WAIT)
    assert eng.calls == [("generate", "b")] and len(sent.msgs) == 2, sent.msgs


def test_duplicate_request_id_while_queued_is_refused(rig) -> None:
    """Two generates of one request_id waiting here at once: the second is refused at
    once (a cancel could not tell them apart); the first goes on."""
    prep, sent, eng, p, _, generate = rig
    prep.block("a")
    generate("a")
    assert prep.entered["a"].wait(WAIT)
    generate("a")
    msg = sent.wait_for(1)[0]
    assert msg["id"] == "a-rpc" and msg["error"]["data"]["code"] == "duplicate_request", msg
    prep.release["a"].set()
    p.close(WAIT)
    assert eng.calls == [("generate", "a")]


def test_long_prompts_do_not_hold_up_health(rt) -> None:
    """The real runtime, F2 as the red team sent it: generates of 4 messages of 240k
    characters (~1 s each to template and tokenize here), then health. Health is
    answered while they are still being prepared: before the last of them is (each
    ends context_exceeded, the tiny model's context being 2,048 tokens); a plain
    generate after them runs. Mutation caught: handle() preparing on the reader
    again (health waits behind all three: the last is answered first)."""
    big = ("lorem ipsum dolor sit amet, " * 9000)[:240_000]
    messages = [{"role": "user", "content": big}] * 4
    ids = [
        rt.request("generate", {"request_id": rid("big"), "model": "tiny", "messages": messages})
        for _ in range(3)
    ]
    assert rt.result("health")["ok"] is True
    assert rt._q(ids[-1]).empty(), "a long prompt was answered before health"
    for rpc_id in ids:
        err = rt.wait(rpc_id)["error"]
        assert err["data"]["code"] == "context_exceeded", err
    res = rt.result("generate", {"request_id": rid(), "model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert res["usage"]["completion_tokens"] >= 1
