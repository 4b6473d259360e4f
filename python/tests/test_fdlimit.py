"""The runtime starts under a low hard open-file limit, and mlx-lm's import lowers none.

Mutation caught: __init__ without import_mlx_lm(): the (256, 1024) start fails with
mlx-lm's ValueError, and a start under a hard limit above 4096 ends with it cut to 4096.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from mlx_serving_runtime.fdlimit import wanted_soft

INF = resource.RLIM_INFINITY

PROBE = (
    "import resource, mlx_serving_runtime.engine, mlx_lm.utils; "
    "print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
)


def _limits_after_import(soft: int, hard: int) -> tuple[int, int]:
    cur_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if cur_hard != INF and hard > cur_hard:
        pytest.fail(f"this test needs a hard open-file limit of at least {hard}, has {cur_hard}")
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got_soft, got_hard = (int(x) for x in done.stdout.split())
    return got_soft, got_hard


def test_starts_under_a_hard_limit_below_mlx_lms():
    # mlx-lm asks for (2048, 4096); with a hard limit of 1024 that raised ValueError.
    assert _limits_after_import(256, 1024) == (1024, 1024)


def test_the_hard_limit_is_not_lowered():
    # mlx-lm's call alone would leave (2048, 4096) for good (or fail below 4096).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == INF:
        hard = 8192
    assert _limits_after_import(256, hard) == (min(2048, hard), hard)


@pytest.mark.parametrize(
    ("want", "soft", "hard", "expect"),
    [
        (2048, 256, 1024, 1024),  # capped at the hard limit
        (2048, 256, 8192, 2048),  # raised as asked
        (2048, 20000, 20000, 20000),  # never lowered
        (2048, 256, INF, 2048),
        (2048, INF, INF, INF),
        (INF, 256, 1024, 1024),
        (INF, 256, INF, INF),
    ],
)
def test_wanted_soft(want, soft, hard, expect):
    assert wanted_soft(want, soft, hard) == expect
