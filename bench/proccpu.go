package bench

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CPUEnv names a file to which every load level appends one JSON line: the CPU
// time each process of the bench's process tree (the bench itself with its
// embedded NATS server, the dispatcher, the worker, the runtimes) spent during
// the level, and the tokens the level generated. Unset: nothing is read. On a
// machine whose cores are shared by the runtime and the Go services, CPU per
// token is what the services take from generation.
const CPUEnv = "MLX_SERVING_BENCH_CPU"

// clockTicks is USER_HZ, 100 on every Linux this runs on (sysconf is not
// reachable without cgo).
const clockTicks = 100

// procCPU is one process's cumulative user+system CPU, in clock ticks.
type procCPU struct {
	Name  string
	Ticks int64
}

// treeCPU reads the CPU of root and all its descendants, keyed by pid. Outside
// Linux (no /proc) it returns an empty map.
func treeCPU(root int) map[int]procCPU {
	out := map[int]procCPU{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	parent := map[int]int{}
	stats := map[int]procCPU{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		ppid, ticks, ok := parseStat(string(b))
		if !ok {
			continue
		}
		parent[pid] = ppid
		stats[pid] = procCPU{Name: procName(pid), Ticks: ticks}
	}
	for pid, st := range stats {
		for p := pid; p > 1; p = parent[p] {
			if p == root {
				out[pid] = st
				break
			}
		}
	}
	return out
}

// parseStat reads ppid and utime+stime from a /proc/PID/stat line. The command
// name (field 2) may hold spaces and parentheses, so fields count from the last
// ')'.
func parseStat(s string) (ppid int, ticks int64, ok bool) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return 0, 0, false
	}
	ppid, err1 := strconv.Atoi(f[1])
	ut, err2 := strconv.ParseInt(f[11], 10, 64)
	st, err3 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, false
	}
	return ppid, ut + st, true
}

// procName names a process by its command line: "mlx-serving worker" (the
// executable's base name and its subcommand), "mlx_serving_runtime" (python -m),
// "bench+nats" for the bench process itself.
func procName(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return "?"
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if pid == os.Getpid() {
		return "bench+nats"
	}
	for i, a := range args {
		if a == "-m" && i+1 < len(args) {
			return args[i+1]
		}
	}
	name := filepath.Base(args[0])
	if len(args) > 1 && !strings.HasPrefix(args[1], "-") {
		name += " " + args[1] // the subcommand: worker, dispatcher, gateway
	}
	return name
}

// cpuLevel is one load level's line in the CPUEnv file.
type cpuLevel struct {
	At          time.Time          `json:"at"`
	Concurrency int                `json:"concurrency"`
	Requests    int                `json:"requests"`
	Tokens      int                `json:"tokens"`
	WallS       float64            `json:"wall_s"`
	CPUS        map[string]float64 `json:"cpu_s"`            // by process name
	USPerToken  map[string]float64 `json:"cpu_us_per_token"` // by process name
}

// cpuDelta is the CPU each process spent between two treeCPU readings, summed
// by name (a process that started in between counts from zero).
func cpuDelta(before, after map[int]procCPU) map[string]float64 {
	out := map[string]float64{}
	for pid, a := range after {
		d := a.Ticks - before[pid].Ticks
		out[a.Name] += float64(d) / clockTicks
	}
	return out
}

// recordCPU appends a level's CPU use to the CPUEnv file, when set.
func recordCPU(before map[int]procCPU, concurrency int, samples []Sample, wall time.Duration) {
	path := os.Getenv(CPUEnv)
	if path == "" {
		return
	}
	l := cpuLevel{At: time.Now().UTC(), Concurrency: concurrency, Requests: len(samples), WallS: wall.Seconds(), CPUS: cpuDelta(before, treeCPU(os.Getpid())), USPerToken: map[string]float64{}}
	for _, s := range samples {
		if s.Err == nil {
			l.Tokens += s.Tokens
		}
	}
	for name, s := range l.CPUS {
		if l.Tokens > 0 {
			l.USPerToken[name] = s * 1e6 / float64(l.Tokens)
		}
	}
	b, err := json.Marshal(l)
	if err != nil {
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = f.Write(append(b, '\n'))
}
