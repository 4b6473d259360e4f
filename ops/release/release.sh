#!/usr/bin/env bash
# Builds a release into dist/: mlx-serving for darwin/arm64, darwin/amd64 and
# linux/amd64 (static, CGO_ENABLED=0, version and commit stamped), the runtime's
# wheel, the JSON schemas the runtime validates against, and SHA256SUMS.
#
#   VERSION=v0.2.0 bash ops/release/release.sh     (or: go tool task release)
#
# VERSION defaults to `git describe --tags --always --dirty`, COMMIT to HEAD.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

commit="${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
version="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
python="${MLX_SERVING_PYTHON:-$root/python/.venv/bin/python}"
dist="$root/dist"

if [ ! -x "$python" ]; then
  echo "release: $python missing; run 'go tool task setup' first" >&2
  exit 1
fi

rm -rf "$dist"
mkdir -p "$dist"

ldflags="-s -w -X main.version=$version -X main.commit=$commit"
for target in darwin/arm64 darwin/amd64 linux/amd64; do
  os="${target%/*}"
  arch="${target#*/}"
  out="$dist/mlx-serving-$version-$os-$arch"
  echo "release: building $out"
  CGO_ENABLED=0 GOOS="$os" GOARCH="$arch" go build -trimpath -ldflags "$ldflags" -o "$out" ./cmd/mlx-serving
done

# The wheel is built from a copy: setuptools writes build/ and egg-info into the
# source tree it is given.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$root/python" --exclude=.venv --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=.pytest_cache -cf - . | tar -C "$work" -xf -
# The wheel carries the runtime's schemas inside the package (package-data), so
# an installed runtime needs nothing from the repository.
mkdir -p "$work/mlx_serving_runtime/schemas"
cp "$root"/schemas/runtime.*.json "$work/mlx_serving_runtime/schemas/"
# The error codes the runtime answers with; without them it refuses to start.
mkdir -p "$work/mlx_serving_runtime/schemas/codes"
cp "$root"/schemas/codes/errors.json "$work/mlx_serving_runtime/schemas/codes/"
echo "release: building the runtime wheel"
"$python" -m pip wheel --quiet --no-deps -w "$dist" "$work"

# All schemas, for tools and services that validate bus messages themselves.
tar -C "$root" -czf "$dist/mlx-serving-schemas-$version.tar.gz" --exclude=testdata --exclude='*.go' schemas

# The binary for this machine must report what was stamped into it.
host="$dist/mlx-serving-$version-$(go env GOOS)-$(go env GOARCH)"
if [ -x "$host" ]; then
  got="$("$host" version --no-runtime --json)"
  case "$got" in
    *"\"version\":\"$version\""*"\"commit\":\"$commit\""*) ;;
    *) echo "release: $host reports $got, want version $version commit $commit" >&2; exit 1 ;;
  esac
fi

cd "$dist"
if command -v sha256sum >/dev/null; then
  sha256sum -- * > SHA256SUMS
else
  shasum -a 256 -- * > SHA256SUMS # macOS
fi
echo "release: $version ($commit) in $dist"
cat SHA256SUMS
