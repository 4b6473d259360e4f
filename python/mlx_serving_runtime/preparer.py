"""Generate preparation (chat template, tokenizing, checks: request_from_params) off
the reader thread, on one preparer thread, first in first out.

Why: the reader prepared each generate itself. Rendering and tokenizing a large but
valid prompt takes 0.6-1.4 s (red team round 11, F2: 4 messages of 240k characters,
~0.96 MB), and eight slots' worth queued up ahead of the worker's `health`, which
waited past its 5 s timeout: the worker's supervisor took the runtime for wedged and
restarted it, failing every tenant's running jobs. A burst of long-document (RAG)
prompts does the same without any attacker. HF tokenizers release the GIL while they
encode, so with the work here the reader goes on answering health and runtime.info,
and taking cancels and shutdowns, at once.

- PREPARE_THREADS threads (up to 4), taking generates in the order they arrived:
  one slow preparation (a long document from one tenant) no longer holds up the
  small generates behind it, which a single thread did (red team round 11's
  prompts: 0.6-1.4 s each; every other tenant's request on that worker waited
  behind them). One cache_scope (tenant) has at most half the threads (at least
  one): a tenant's burst of long prompts leaves the rest to other tenants, whose
  generates are taken past its waiting ones. Generates may be handed on out of
  order among themselves; never across a command (below). Tokenizers release the GIL, so the threads encode at
  once; a chat template's rendering (Python) takes turns. The queue is not bounded
  here: the worker bounds generates in flight by its slots.
- Stack: compiler.COMPILE_STACK_BYTES, as the generation thread's: preparing walks
  the request's schemas and messages (tools, templates), which recurse per level.
- A failure (RpcError, RecursionError, any exception) answers that request only; the
  thread lives on to prepare the next.

Order: the engine sees commands in the order they were sent. model.load,
model.unload and a drain shutdown are queued here behind the generates sent before
them (then()), and run only once every one of those is handed on or answered; a
generate sent after a command is taken only once the command ran: an unload still
cancels a generate sent just before it, a drain still runs it (it was not sent
after the shutdown), and a reload's unload and load are not swapped. A cancel-mode
shutdown (and EOF on stdin) does not wait: it refuses what is here.

Exactly one answer per generate, as in compiler.py: a request is settled once, under
the lock, by its preparation's end or by a shutdown, whichever comes first; the other
does nothing. Handing a prepared request on (to the grammar compiler or the engine)
happens under the same lock, so:
- a cancel for a request still queued or being prepared is held and passed on right
  behind it (to the compiler if it compiles, else to the engine, which then has the
  generate queued before the cancel); if it fails to prepare, the cancel is answered
  `cancelled: false` after its error. A cancel that finds nothing held here was handed
  on already, so the compiler or the engine has the generate first.
- refuse_pending (engine.shutting_down set first, so no new generate comes) answers
  shutting_down what is still here, generates and queued commands; what was handed
  on before it is compiling or queued on the engine ahead of the engine's shutdown
  command, which ends it. A preparation it overtook is dropped when it ends.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import compiler as compiler_mod
from . import validation
from .protocol import RpcError, duplicate_request, error_response, invalid_params, response
from .request import request_from_params

if TYPE_CHECKING:
    from .compiler import GrammarCompiler
    from .engine import Engine
    from .request import Request

log = logging.getLogger("mlx_serving_runtime")

# Preparation threads (see above): enough that a few long prompts do not hold up
# the rest, few enough that they do not take the cores generation runs on.
PREPARE_THREADS = max(1, min(4, os.cpu_count() or 1))


def hand_on(engine: Engine, compiler: GrammarCompiler | None, req: Request) -> bool:
    """Queue a prepared request: its grammar to the compiler (answered from its compile
    thread), else the request to the engine (which compiles a grammar itself when
    there is no compiler). True when the compiler took it. Raises RpcError."""
    if compiler is not None and req.compile_grammar is not None:
        compiler.submit(req)
        return True
    engine.submit_generate(req)
    return False


def failure(e: BaseException) -> RpcError:
    """The answer to a request whose preparation raised e (as handle() answers)."""
    if isinstance(e, RpcError):
        return e
    if isinstance(e, RecursionError):
        return RpcError("invalid_params", "the request nests too deep")
    return RpcError("generation_failed", f"{type(e).__name__}: {e}")


class _Item:
    """A generate waiting for preparation or being prepared."""

    def __init__(self, rpc_id: Any, params: dict[str, Any]) -> None:
        self.rpc_id = rpc_id
        self.params = params
        self.request_id: str = params["request_id"]
        scope = params.get("cache_scope", "")  # the tenant; checked with the params later
        self.scope: str = scope if isinstance(scope, str) else ""
        self.settled = False
        self.cancel_rpc: Any = None  # a cancel held until the generate is settled
        self.has_cancel = False


_CLOSE = object()  # _pick: close() is at the head of the queue


class _Command:
    """An engine command queued behind the generates sent before it (then())."""

    def __init__(self, rpc_id: Any, run: Callable[[], None]) -> None:
        self.rpc_id = rpc_id
        self.run = run
        self.settled = False


class Preparer:
    def __init__(
        self,
        engine: Engine,
        send: Callable[[dict[str, Any]], None],
        compiler: GrammarCompiler | None = None,
        stack_bytes: int | None = None,
        threads: int | None = None,
    ) -> None:
        self._engine = engine
        self._send = send
        self._compiler = compiler
        self._cond = threading.Condition()
        self._queue: deque[_Item | _Command | None] = deque()  # None: close()
        self._pending: dict[str, _Item] = {}  # request_id -> queued or being prepared
        self._active: set[_Item | _Command] = set()  # taken off the queue, being worked on
        self._scopes: dict[str, int] = {}  # cache_scope -> generates being prepared
        stack = compiler_mod.COMPILE_STACK_BYTES if stack_bytes is None else stack_bytes
        n = PREPARE_THREADS if threads is None else max(1, threads)
        self._per_scope = max(1, n // 2)
        self._threads = [
            threading.Thread(target=self._run, name=f"generate-prepare-{i}", daemon=True) for i in range(n)
        ]
        for t in self._threads:
            compiler_mod.start_with_stack(t, stack)

    # ---- reader thread ----

    def submit(self, rpc_id: Any, params: dict[str, Any]) -> None:
        """Queue a generate (params schema-checked) for preparation; answered from the
        preparer thread, or by the engine or compiler it is handed to. Raises RpcError
        (answered by the caller) for a request_id already waiting here."""
        item = _Item(rpc_id, params)
        with self._cond:
            if item.request_id in self._pending:
                raise duplicate_request(item.request_id)
            self._pending[item.request_id] = item
            self._queue.append(item)
            self._cond.notify()

    def then(self, rpc_id: Any, run: Callable[[], None]) -> None:
        """Run an engine command (run queues it) once the generates queued before it
        are handed on, so the engine sees them in the order they were sent: an unload
        cancels a generate sent before it, a drain runs it, a load and an unload of
        one model keep their order. refuse_pending answers it shutting_down instead."""
        with self._cond:
            self._queue.append(_Command(rpc_id, run))
            self._cond.notify_all()

    def hold_cancel(self, rpc_id: Any, request_id: str) -> bool:
        """Hold a cancel for a request still queued or being prepared (passed on behind
        it, or answered when it fails); False when none is here, and the compiler or
        the engine should take it."""
        with self._cond:
            item = self._pending.get(request_id)
            if item is None:
                return False
            item.cancel_rpc, item.has_cancel = rpc_id, True
            return True

    def refuse_pending(self, why: str) -> None:
        """Answer every request and command queued or being prepared with
        shutting_down (the runtime is leaving: its engine would not run them). Call
        after engine.shutting_down is set, before the engine's shutdown command."""
        with self._cond:
            entries = [e for e in (*self._active, *self._queue) if e is not None and not e.settled]
            for e in entries:
                e.settled = True
            self._queue = deque(e for e in self._queue if e is None)  # keep a close()
            self._pending.clear()
        err = RpcError("shutting_down", f"runtime is shutting down ({why})")
        for e in entries:
            if isinstance(e, _Item):
                self._answer(e, err)
            elif e.rpc_id is not None:
                self._send(error_response(e.rpc_id, err))

    def close(self, timeout: float | None = None) -> None:
        """Stop the threads once what is queued is done (tests)."""
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # ---- preparer threads ----

    def _take(self) -> _Item | _Command | None:
        """The next entry to work on (_pick), waiting for one; None once close() is
        at the head (left there for the other threads). Under the lock."""
        while True:
            e = self._pick()
            if e is _CLOSE:
                return None
            if e is not None:
                return e
            self._cond.wait()

    def _pick(self) -> Any:
        """The entry to work on now, taken off the queue and marked active, in the
        order sent: a command only once nothing taken before it is still being
        worked on; a generate whose scope has its share of the threads is passed
        over for a later one of another scope, never across a command. None when
        there is nothing to take now; _CLOSE when close() is at the head. Under the
        lock."""
        while self._queue and self._queue[0] is not None and self._queue[0].settled:
            self._queue.popleft()  # refused by a shutdown while queued
        if any(isinstance(a, _Command) for a in self._active):
            # A command taken runs under the lock, but its thread takes the lock
            # again to run it: a generate sent after it, taken meanwhile, could be
            # handed on first.
            return None
        for i, e in enumerate(self._queue):
            if e is None:
                return _CLOSE if i == 0 else None
            if isinstance(e, _Command):
                if i == 0 and not self._active:
                    self._queue.popleft()
                    self._active.add(e)
                    return e
                return None
            if not e.settled and self._scopes.get(e.scope, 0) < self._per_scope:
                del self._queue[i]
                self._active.add(e)
                self._scopes[e.scope] = self._scopes.get(e.scope, 0) + 1
                return e
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                entry = self._take()
                if entry is None:
                    return
            try:
                if isinstance(entry, _Command):
                    self._command(entry)
                else:
                    self._prepare(entry)
            except Exception:  # a bug here must not stop every later request
                log.exception("preparer: %r failed", getattr(entry, "request_id", entry.rpc_id))
                self._fail(entry)
            finally:
                with self._cond:
                    self._active.discard(entry)
                    if isinstance(entry, _Item):
                        left = self._scopes.pop(entry.scope) - 1
                        if left:
                            self._scopes[entry.scope] = left
                    self._cond.notify_all()  # a command, or the scope's next, may wait for this one

    def _command(self, cmd: _Command) -> None:
        with self._cond:
            if cmd.settled:
                return
            cmd.settled = True
            # Under the lock, as a hand-on: a cancel-mode shutdown on the reader then
            # either refuses the command or queues the engine's shutdown behind it
            # (the engine answers a load or unload queued before its shutdown; one
            # queued after would go unanswered).
            cmd.run()

    def _fail(self, entry: _Item | _Command) -> None:
        """The net under a bug: answer what is not settled yet."""
        with self._cond:
            if entry.settled:
                return
            entry.settled = True
            if isinstance(entry, _Item):
                self._pending.pop(entry.request_id, None)
        err = RpcError("generation_failed", "request preparation failed")
        if isinstance(entry, _Item):
            self._answer(entry, err)
        elif entry.rpc_id is not None:
            self._send(error_response(entry.rpc_id, err))

    def _prepare(self, item: _Item) -> None:
        req: Request | None = None
        err: RpcError | None = None
        try:
            # The params' schema check, off the reader (__main__.handle says why).
            bad = validation.violations("runtime.generate.params", item.params)
            if bad:
                raise invalid_params("generate", bad)
            req = request_from_params(self._engine, item.rpc_id, item.params)
            if self._compiler is None and req.compile_grammar is not None:
                # No compiler (tests): compile here, not under the lock below, where
                # it would hold up the reader's hold_cancel for as long as it runs.
                req.grammar, req.compile_grammar = req.compile_grammar(), None
        except Exception as e:  # RecursionError included: answers this request only
            if not isinstance(e, (RpcError, RecursionError)):
                log.exception("request %r: preparation failed", item.request_id)
            err = failure(e)
        with self._cond:
            if item.settled:  # a shutdown answered it meanwhile: drop the result
                return
            item.settled = True
            self._pending.pop(item.request_id, None)
            if err is None and req is not None:
                # Handed on under the lock, so a cancel or shutdown on the reader finds
                # it either still here or already with the compiler or the engine.
                try:
                    to_compiler = hand_on(self._engine, self._compiler, req)
                except Exception as e:  # runtime_busy, duplicate_request, a bug
                    if not isinstance(e, RpcError):
                        log.exception("request %r: hand-on failed", item.request_id)
                    err = failure(e)
                else:
                    if item.has_cancel:  # right behind its generate
                        c = self._compiler if to_compiler else None
                        if c is None or not c.hold_cancel(item.cancel_rpc, item.request_id):
                            self._engine.submit("cancel", item.cancel_rpc, item.request_id)
                    return
        self._answer(item, err or RpcError("generation_failed", "request preparation failed"))

    def _answer(self, item: _Item, err: RpcError) -> None:
        """Answer a settled request's error, and its held cancel (nothing to cancel)."""
        self._send(error_response(item.rpc_id, err))
        if item.has_cancel:
            self._send(response(item.cancel_rpc, {"request_id": item.request_id, "cancelled": False}))
