// Package chaos holds the fault campaigns: the real binaries (nats-server built
// from the module cache, `mlx-serving dispatcher` and `mlx-serving worker` with
// their Python runtimes on the tiny model) run as separate processes on
// loopback while the tests kill them with SIGKILL and restart them, then a
// checker in the spirit of Jepsen's queue checker verifies that every submitted
// job ended in exactly one terminal record and that no caller saw anything the
// system promises it will not.
//
// `go test ./tests/chaos` runs the short campaign (a few minutes at most);
// CHAOS_FULL=1 runs the full one (1,000 jobs, NATS cluster faults included).
// CHAOS_SEED replays a campaign's fault schedule. TestWholeStackKill (every
// process SIGKILLed at once while results are written, then restarted on the
// same store) and TestNATSKilledWhileWorkersRun run 2 rounds short, 10 and 6
// full; CHAOS_ROUNDS overrides.
package chaos
