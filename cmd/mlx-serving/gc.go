package main

import (
	"os"
	"runtime/debug"
)

// workerGCPercent is the worker process's GOGC unless the environment sets
// GOGC or GOMEMLIMIT. The worker's live heap is small (~2-4 MB under 32 slots)
// and its garbage is mostly per-token events, so Go's default of 100 lets the
// heap idle at twice the live size: 50 kept ~2 MB off the worker's RSS under
// the c=32 bus load (BENCHMARKS.md, memory). GC cost is not measurable there: the
// worker spends ~5 µs per token (BenchmarkTokenPathThroughput, same either way).
// It is a setting on top of the real fixes, not one of them.
const workerGCPercent = 50

// tuneWorkerGC applies workerGCPercent unless the operator chose GOGC or
// GOMEMLIMIT (then the runtime already follows those); it reports whether it did.
func tuneWorkerGC() bool {
	_, gogc := os.LookupEnv("GOGC")
	_, limit := os.LookupEnv("GOMEMLIMIT")
	if gogc || limit {
		return false
	}
	debug.SetGCPercent(workerGCPercent)
	return true
}
