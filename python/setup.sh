#!/usr/bin/env bash
# Creates python/.venv and installs the runtime with its pinned dependencies from
# the package registry. Called by `go tool task setup`, which skips it when the
# stamp matches pyproject.toml and this script.
#
# System libraries: the mlx-cpu wheel (Linux) bundles BLAS, LAPACK and libgfortran and
# needs only libstdc++6 and libgcc-s1 beyond glibc >= 2.35 — present on any Debian with
# apt. g++ is optional: without it MLX skips its CPU JIT (mx.compile) silently. The
# apt-get calls below run only when something is actually missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

apt_install() {
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup.sh: installing missing system packages: $*" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; }
  else
    echo "setup.sh: missing system packages: $* (install them, e.g. apt-get install $*)" >&2
    return 1
  fi
}

if [ ! -x python/.venv/bin/python ]; then
  # Debian's python3 ships venv/ensurepip separately.
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install "python3-venv"
  fi
  "$PYTHON" -m venv python/.venv
fi
echo "setup.sh: installing the MLX runtime and its pinned dependencies into python/.venv (first run, or after pyproject.toml changed) ..." >&2
start=$(date +%s)
# uv (from PyPI, one wheel) downloads and installs in parallel: ~5 s here against 30-80 s for
# pip, most of a first `go tool task up`. pip stays the fallback.
if [ -z "${SSL_CERT_FILE:-}" ] && [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE=$PIP_CERT; fi
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS=$PIP_FIND_LINKS; fi
if python/.venv/bin/pip install --quiet --disable-pip-version-check uv &&
  python/.venv/bin/uv pip install --quiet --python python/.venv/bin/python -e 'python[test]'; then
  :
else
  echo "setup.sh: uv failed; installing with pip" >&2
  python/.venv/bin/pip install --quiet --disable-pip-version-check -e 'python[test]'
fi
echo "setup.sh: runtime installed in $(( $(date +%s) - start )) s" >&2

if [ "$(uname -s)" = Linux ]; then
  libmlx=$(python/.venv/bin/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("mlx").submodule_search_locations[0]) / "lib" / "libmlx.so")')
  if ldd "$libmlx" 2>/dev/null | grep -q 'not found'; then
    apt_install libstdc++6 libgcc-s1
  fi
  python/.venv/bin/python -c 'import mlx.core as mx; mx.eval(mx.ones(2) + 1)'
fi
sha256sum python/pyproject.toml python/setup.sh | sha256sum > python/.venv/.installed
