"""Grammar compiles (json_schema, tools) off the reader thread, each on a fresh
thread with a large stack and a time limit.

Why: llguidance compiled on the reader thread. A schema that compiled for minutes
(red team round 8: 500 patternProperties, 73 s) held up health checks, cancels and
every other generate meanwhile, so the worker restarted the runtime, failing every
co-running job; and its compiler recurses natively once per level of the grammar, so
a deep $ref chain overflowed the main thread's 8 MiB stack and killed the process
with SIGSEGV. The schema bounds (schema_bounds.py) refuse both before a compile
starts; this is the defence behind them, for whatever compiles slowly or deeply
inside them.

- Stack: COMPILE_STACK_BYTES, 256 MiB (32 times the main thread's 8 MiB, which the
  950-object chain overflowed; the depth bound keeps real grammars far below). It is
  virtual memory, touched only as deep as a compile recurses; Linux and macOS both
  take it (macOS caps only the main thread's stack, not pthread_attr_setstacksize).
- Time: past COMPILE_LIMIT_S the generate is answered invalid_schema ("too complex to
  compile in 5 s"), not retryable: the same schema would time out anywhere.
- A compile cannot be cancelled (llguidance has no hook; the GIL is released while
  it runs, so other threads go on). A timed-out compile keeps its thread until it
  ends, its result dropped. A fresh thread per compile means nothing waits behind
  it; each such thread burns a core, though, so rather than pile up more, new
  compiles are refused at once with runtime_busy (retryable: another attempt, maybe
  on another runtime, may run) while, in the request's cache_scope (its tenant),
  MAX_STUCK_COMPILES run past their limit or MAX_SCOPE_COMPILES run at all, or
  while MAX_COMPILE_THREADS run in all scopes together. The budgets are per scope
  because one shared budget let one tenant's two slow schemas refuse every other
  tenant's structured requests (red team round 9: the dispatcher's three attempts
  ran out in under a second); the scope's running cap keeps one tenant from taking
  the whole of the global one, which bounds threads however many tenants send
  slow schemas (several colluding can still fill it, each holding only its own
  share).

Exactly one answer per generate: the compile's end, its time limit and a shutdown
race to settle it under one lock; the first wins, the others do nothing. A cancel
for a request still compiling is held and passed to the engine right behind the
generate, so it ends the request as a cancel of a queued generate does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .protocol import RpcError, duplicate_request, error_response, response

if TYPE_CHECKING:
    from .engine import Engine
    from .request import Request

log = logging.getLogger("mlx_serving_runtime")

COMPILE_LIMIT_S = 5.0
COMPILE_STACK_BYTES = 256 << 20
MAX_STUCK_COMPILES = 2  # per cache_scope
MAX_SCOPE_COMPILES = 2 * MAX_STUCK_COMPILES  # running at once, per cache_scope
MAX_COMPILE_THREADS = 4 * MAX_STUCK_COMPILES  # running at once, all scopes together

_stack_lock = threading.Lock()  # threading.stack_size is process-wide: set, start, restore


@contextlib.contextmanager
def thread_stacks(stack_bytes: int) -> Iterator[None]:
    """Threads started inside get stacks of stack_bytes. Threads others start
    meanwhile may get the large size too: harmless, it is only reserved address
    space. main() starts the engine's generation thread so too: its matchers walk
    the same grammar the compile did (a grammar that compiled deep on a large stack
    would overflow the generation thread's default one)."""
    with _stack_lock:
        try:
            old = threading.stack_size(stack_bytes)
        except (ValueError, RuntimeError) as e:  # a platform that refuses the size
            log.warning("thread stack size %d refused (%s): default stacks", stack_bytes, e)
            yield
            return
        try:
            yield
        finally:
            threading.stack_size(old)


def start_with_stack(thread: threading.Thread, stack_bytes: int) -> None:
    with thread_stacks(stack_bytes):
        thread.start()


class _Job:
    def __init__(self, req: Request) -> None:
        self.req = req
        self.settled = False
        self.done = False  # the compile returned
        self.expired = False  # its time limit passed while it still ran
        self.cancel_rpc: Any = None  # a cancel held until the generate is settled
        self.has_cancel = False
        self.timer: threading.Timer | None = None


class GrammarCompiler:
    def __init__(
        self,
        engine: Engine,
        send: Callable[[dict[str, Any]], None],
        limit_s: float | None = None,
        max_stuck: int | None = None,
        stack_bytes: int | None = None,
        max_scope: int | None = None,
        max_threads: int | None = None,
    ) -> None:
        # None: the module's constants, read now (a test may have changed them).
        self._engine = engine
        self._send = send
        self.limit_s = COMPILE_LIMIT_S if limit_s is None else limit_s
        self._max_stuck = MAX_STUCK_COMPILES if max_stuck is None else max_stuck
        self._stack = COMPILE_STACK_BYTES if stack_bytes is None else stack_bytes
        self._max_scope = MAX_SCOPE_COMPILES if max_scope is None else max_scope
        self._max_threads = MAX_COMPILE_THREADS if max_threads is None else max_threads
        self._lock = threading.Lock()
        self._pending: dict[str, _Job] = {}  # request_id -> job not settled yet
        # Per cache_scope (entries dropped at 0): compiles past their limit that
        # still run, and compile threads running (stuck or not).
        self._stuck: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._threads = 0  # compile threads running, all scopes

    def _busy(self, scope: str) -> str:
        """Why a new compile in scope is refused now, or "" (under the lock)."""
        stuck = self._stuck.get(scope, 0)
        if stuck >= self._max_stuck:
            return (
                f"{stuck} of this tenant's grammar compiles past their "
                f"{self.limit_s:g} s limit still run; try again later or elsewhere"
            )
        running = self._running.get(scope, 0)
        if running >= self._max_scope:
            return f"{running} of this tenant's grammar compiles run; try again later or elsewhere"
        if self._threads >= self._max_threads:
            return f"{self._threads} grammar compiles run, the most at once; try again later or elsewhere"
        return ""

    def _end_thread(self, scope: str) -> None:
        """A compile thread of scope ended or never started (under the lock)."""
        self._threads -= 1
        _dec(self._running, scope)

    def submit(self, req: Request) -> None:
        """Compile req's grammar, then queue req on the engine or answer its error.
        Raises RpcError (answered by the caller) when it cannot start."""
        job = _Job(req)
        scope = req.cache_scope
        with self._lock:
            busy = self._busy(scope)
            if busy:
                raise RpcError("runtime_busy", busy)
            if req.request_id in self._pending:
                raise duplicate_request(req.request_id)
            self._pending[req.request_id] = job
            self._threads += 1
            self._running[scope] = self._running.get(scope, 0) + 1
        t = threading.Thread(target=self._compile, args=(job,), name="grammar-compile", daemon=True)
        try:
            start_with_stack(t, self._stack)
        except (RuntimeError, ValueError) as e:  # no thread to be had: retryable
            with self._lock:
                self._pending.pop(req.request_id, None)
                self._end_thread(scope)
            raise RpcError("runtime_busy", f"cannot start a compile thread: {e}") from None
        job.timer = threading.Timer(self.limit_s, self._expire, (job,))
        job.timer.daemon = True
        job.timer.start()

    def hold_cancel(self, rpc_id: Any, request_id: str) -> bool:
        """Hold a cancel for a request still compiling (answered when it settles);
        False when none compiles, and the engine should answer it."""
        with self._lock:
            job = self._pending.get(request_id)
            if job is None:
                return False
            job.cancel_rpc, job.has_cancel = rpc_id, True
            return True

    def refuse_pending(self, why: str) -> None:
        """Answer every compiling request with shutting_down (the runtime is leaving:
        its engine would not run them)."""
        with self._lock:
            jobs = list(self._pending.values())
        for job in jobs:
            self._settle(job, None, RpcError("shutting_down", f"runtime is shutting down ({why})"))

    def _compile(self, job: _Job) -> None:
        grammar, err = None, None
        try:
            grammar = job.req.compile_grammar()
        except RpcError as e:
            err = e
        except RecursionError:
            err = RpcError("invalid_params", "the request nests too deep")
        except Exception as e:  # a library surprise answers this request only
            log.exception("grammar compile failed")
            err = RpcError("generation_failed", f"{type(e).__name__}: {e}")
        if job.timer is not None:
            job.timer.cancel()
        with self._lock:
            job.done = True
            self._end_thread(job.req.cache_scope)
            if job.expired:
                _dec(self._stuck, job.req.cache_scope)
                log.warning("request %r: a timed-out compile ended", job.req.request_id)
        self._settle(job, grammar, err)

    def _expire(self, job: _Job) -> None:
        with self._lock:
            if job.settled or job.done:
                return
            job.expired = True
            scope = job.req.cache_scope
            self._stuck[scope] = self._stuck.get(scope, 0) + 1
        log.warning("request %r: grammar compile past %g s", job.req.request_id, self.limit_s)
        self._settle(
            job, None, RpcError("invalid_schema", f"schema too complex to compile in {self.limit_s:g} s")
        )

    def _settle(self, job: _Job, grammar: str | None, err: RpcError | None) -> None:
        with self._lock:
            if job.settled:
                return
            job.settled = True
            self._pending.pop(job.req.request_id, None)
        req = job.req
        if err is None and self._engine.shutting_down:
            err = RpcError("shutting_down", "runtime is shutting down")
        if err is None:
            req.grammar, req.compile_grammar = grammar, None
            try:
                self._engine.submit_generate(req)
            except RpcError as e:
                err = e
            else:
                if job.has_cancel:  # right behind its generate: the engine ends it
                    self._engine.submit("cancel", job.cancel_rpc, req.request_id)
                return
        self._send(error_response(req.rpc_id, err))
        if job.has_cancel:
            self._send(response(job.cancel_rpc, {"request_id": req.request_id, "cancelled": False}))


def _dec(counts: dict[str, int], scope: str) -> None:
    n = counts.get(scope, 0) - 1
    if n > 0:
        counts[scope] = n
    else:
        counts.pop(scope, None)
