package main

import (
	"os"
	"runtime/debug"
	"testing"
)

// The worker runs with workerGCPercent unless the operator set GOGC or
// GOMEMLIMIT, which the runtime already applied and which must then stand.
func TestTuneWorkerGC(t *testing.T) {
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	for _, tc := range []struct {
		env  map[string]string
		want int
		did  bool
	}{
		{env: nil, want: workerGCPercent, did: true},
		{env: map[string]string{"GOGC": "100"}, want: 100},
		{env: map[string]string{"GOMEMLIMIT": "64MiB"}, want: 100},
	} {
		debug.SetGCPercent(100)
		for _, k := range []string{"GOGC", "GOMEMLIMIT"} {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
		for k, v := range tc.env {
			t.Setenv(k, v)
		}
		did := tuneWorkerGC()
		if got := debug.SetGCPercent(100); got != tc.want || did != tc.did {
			t.Errorf("env %v: GOGC %d, applied %v; want %d, %v", tc.env, got, did, tc.want, tc.did)
		}
	}
}
