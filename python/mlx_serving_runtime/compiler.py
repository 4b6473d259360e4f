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
  it; each such thread burns a core, though, so while MAX_STUCK_COMPILES of them
  run, new compiles are refused at once with runtime_busy (retryable: another
  attempt, maybe on another runtime, may run) rather than piling up more.

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

from .protocol import RpcError, error_response, response

if TYPE_CHECKING:
    from .engine import Engine
    from .request import Request

log = logging.getLogger("mlx_serving_runtime")

COMPILE_LIMIT_S = 5.0
COMPILE_STACK_BYTES = 256 << 20
MAX_STUCK_COMPILES = 2

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
    ) -> None:
        # None: the module's constants, read now (a test may have changed them).
        self._engine = engine
        self._send = send
        self.limit_s = COMPILE_LIMIT_S if limit_s is None else limit_s
        self._max_stuck = MAX_STUCK_COMPILES if max_stuck is None else max_stuck
        self._stack = COMPILE_STACK_BYTES if stack_bytes is None else stack_bytes
        self._lock = threading.Lock()
        self._pending: dict[str, _Job] = {}  # request_id -> job not settled yet
        self._stuck = 0  # compiles past their limit that still run

    def submit(self, req: Request) -> None:
        """Compile req's grammar, then queue req on the engine or answer its error.
        Raises RpcError (answered by the caller) when it cannot start."""
        job = _Job(req)
        with self._lock:
            if self._stuck >= self._max_stuck:
                raise RpcError(
                    "runtime_busy",
                    f"{self._stuck} grammar compiles past their {self.limit_s:g} s limit still run; "
                    "try again later or elsewhere",
                )
            if req.request_id in self._pending:
                raise RpcError(
                    "duplicate_request",
                    f"request_id {req.request_id!r} is already in flight",
                    request_id=req.request_id,
                )
            self._pending[req.request_id] = job
        t = threading.Thread(target=self._compile, args=(job,), name="grammar-compile", daemon=True)
        try:
            start_with_stack(t, self._stack)
        except (RuntimeError, ValueError) as e:  # no thread to be had: retryable
            with self._lock:
                self._pending.pop(req.request_id, None)
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
            if job.expired:
                self._stuck -= 1
                log.warning("request %r: a timed-out compile ended", job.req.request_id)
        self._settle(job, grammar, err)

    def _expire(self, job: _Job) -> None:
        with self._lock:
            if job.settled or job.done:
                return
            job.expired = True
            self._stuck += 1
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
