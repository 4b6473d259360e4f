package dispatcher

import (
	"testing"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
)

// Only a report of an attempt this dispatcher has running (or offered) is worth
// its schema check; the rest of a flood is dropped on three decoded fields.
// Mutation caught: mayReport without its attempt comparison (the report of an
// earlier attempt passes).
func TestMayReportOnlyForAHeldAttempt(t *testing.T) {
	t.Parallel()
	d := &Dispatcher{jobs: map[string]*job{}}
	run := &job{id: "r", tenant: "a", attempt: 2, state: StateRunning, workerID: "w1"}
	queued := &job{id: "q", tenant: "a", attempt: 1, state: StateQueued}
	for _, j := range []*job{run, queued} {
		d.jobs[subjects.JobRef{Tenant: j.tenant, ID: j.id}.Key()] = j
	}
	for _, c := range []struct {
		name, wid, body string
		want            bool
	}{
		{"running attempt", "w1", `{"job_id":"r","tenant":"a","attempt":2,"text":"…"}`, true},
		{"another worker naming it (checked after the schema: counted forged)", "w2", `{"job_id":"r","tenant":"a","attempt":2}`, true},
		{"earlier attempt", "w1", `{"job_id":"r","tenant":"a","attempt":1}`, false},
		{"queued job", "w1", `{"job_id":"q","tenant":"a","attempt":1}`, false},
		{"unknown job", "w1", `{"job_id":"x","tenant":"a","attempt":1}`, false},
		{"another tenant's id", "w1", `{"job_id":"r","tenant":"b","attempt":2}`, false},
		{"not JSON", "w1", `{"job_id":`, false},
		{"no worker", "", `{"job_id":"r","tenant":"a","attempt":2}`, false},
	} {
		if got := d.mayReport(c.wid, []byte(c.body)); got != c.want {
			t.Errorf("%s: mayReport %v, want %v", c.name, got, c.want)
		}
	}
}
