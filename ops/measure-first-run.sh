#!/usr/bin/env bash
# Time a first run as a new user has it: a fresh clone of this repository, the Go module
# cache warm (go mod download done once), but nothing built (empty GOCACHE) and no
# python/.venv. Prints the seconds from `go tool task up` to the first 200 from /readyz.
# Usage: bash ops/measure-first-run.sh   (uses ports 18080 and 14222)
set -u
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'kill -INT $pid 2>/dev/null; sleep 3; pkill -f "$work" 2>/dev/null; rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
export GOCACHE=$work/gocache
start=$(date +%s.%N)
go tool task up -- --http-addr 127.0.0.1:18080 --nats-listen 127.0.0.1:14222 --data-dir "$work/data" > "$work/up.log" 2>&1 &
pid=$!
until curl -sf http://127.0.0.1:18080/readyz >/dev/null 2>&1; do
  kill -0 $pid 2>/dev/null || { echo "up exited:"; tail -20 "$work/up.log"; exit 1; }
  sleep 0.2
done
end=$(date +%s.%N)
grep -m1 "runtime installed" "$work/up.log"
echo "readyz after $(echo "$end - $start" | bc) s"
