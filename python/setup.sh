#!/usr/bin/env bash
# Creates python/.venv and installs the runtime with its pinned dependencies from
# the package registry. Called by `go tool task setup`, which skips it when the
# stamp matches pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x python/.venv/bin/python ]; then
  "$PYTHON" -m venv python/.venv
fi
python/.venv/bin/pip install --quiet --disable-pip-version-check -e 'python[test]'
sha256sum python/pyproject.toml python/setup.sh | sha256sum > python/.venv/.installed
