"""mlx-lm's open-file limit, kept from stopping the runtime.

Importing ``mlx_lm.utils`` calls ``resource.setrlimit(RLIMIT_NOFILE, (2048, 4096))``
("for large models with lots of files"). Where the hard limit is below 4,096 (a
container or service started with ``ulimit -Hn 1024``) raising it is not allowed, the
import raises ValueError and the runtime never starts: the worker restarts it in a
loop and every job for its models waits. Where the limits were higher, the call lowers
them, the hard one for good. ``import_mlx_lm`` imports it with that one call taken as
what it means — at least 2,048 descriptors where the hard limit allows — and never
lowering or raising past the limits the process was given.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

_INF = resource.RLIM_INFINITY


def wanted_soft(want: int, soft: int, hard: int) -> int:
    """The soft limit to set for a request of ``want``: at least the current one, at
    most the hard one."""
    if soft == _INF:
        return soft
    if hard != _INF and (want == _INF or want > hard):
        want = hard
    return soft if want != _INF and want < soft else want


@contextlib.contextmanager
def _bounded_setrlimit() -> Iterator[None]:
    real = resource.setrlimit

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            return real(which, limits)
        soft, hard = resource.getrlimit(which)
        return real(which, (wanted_soft(limits[0], soft, hard), hard))

    resource.setrlimit = setrlimit
    try:
        yield
    finally:
        resource.setrlimit = real


def import_mlx_lm() -> None:
    """Import mlx_lm.utils (and so mlx_lm) once, its limit call bounded (see above)."""
    if "mlx_lm.utils" in sys.modules:
        return
    with _bounded_setrlimit():
        import mlx_lm.utils  # noqa: F401
