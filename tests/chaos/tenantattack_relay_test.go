package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/auth"
	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Relayed server answers (red team round 12, F2 and F3). The NATS server
// itself publishes a JetStream publish ack, and a direct get's answer, onto
// whatever reply subject the requester named, without checking that the
// requester may publish there. Named a stream's subject (b's record, b's job,
// b's cancel, another worker's registry key), the answer is stored there; named
// a $JS.API subject, the JetStream API runs it as a request of the account
// (MSG.DELETE, PURGE, CONSUMER.CREATE), if the body parses. A publish ack's
// body is fixed ({"stream":..,"seq":N}); a direct get answers with a value the
// attacker wrote itself — a worker's own registry key, or a models key (any
// worker writes it, any producer direct-gets it: the pair).
//
// Every row is judged by state read back with the admin handle: b's subject
// holds nothing new, b's records are all there, the registry entry of w1 is
// w1's, no consumer was made on RESULTS, the attacker received nothing; and
// then b's later job of the id runs as b's own, b's running job completes.
// A row whose relay took effect succeeded.

// relayWait is how long a relay has to show its effect. Every relay of a group
// is sent first and their effects polled together, so a group that is refused
// costs this once. Where a relay works it shows within milliseconds.
const relayWait = 2 * time.Second

type relayRow struct {
	actor, action string
	effect        func(ctx context.Context) (bool, string) // read back: did the relay take effect, and what
	after         func(ctx context.Context) (bool, string) // b's later job or running job, once the group is judged
	row           *attackRow
}

type relayer struct {
	at    *attackTable
	pa    *busClient // producer a
	w2    *busClient // worker w2 (w1 is the other rows' attacker, and the eviction's victim here)
	prodB *bus.Client
	n     int
	// w2beat is w2's heartbeat as it stood: what w2 puts with a reply
	// subject, so the put itself changes nothing.
	w2beat []byte
}

// relayAttacks runs the relay rows. Run last: on a stack with the holes they
// delete and purge records, and evict w1.
func (at *attackTable) relayAttacks(ctx context.Context, pa *busClient, prodB *bus.Client) {
	start := time.Now()
	r := &relayer{at: at, pa: pa, w2: at.s.connect(auth.RoleWorker, "w2"), prodB: prodB}
	pair := r.w2.name + "+" + r.pa.name
	kv, err := at.s.adminJS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		at.t.Fatal(err)
	}
	e, err := kv.Get(ctx, "w2")
	if err != nil {
		at.t.Fatalf("w2's registry entry: %v", err)
	}
	r.w2beat = e.Value()

	// b's targets: two records (deleted by sequence), two running jobs (cancelled).
	delW, delP := r.bRecord(ctx, "brelaydelw"), r.bRecord(ctx, "brelaydelp")
	canW, canP := r.bRunning(ctx, "brelaycanw"), r.bRunning(ctx, "brelaycanp")

	// Group 1: writes into b's subjects and the JetStream API, one per target.
	var g1 []*relayRow
	for _, c := range []*busClient{r.pa, r.w2} {
		for i, t := range []struct {
			stream string
			target func(id string) string
		}{
			{subjects.StreamResults, func(id string) string { return subjects.Result("b", id) }},
			{subjects.StreamJobs, func(id string) string { return subjects.Job("b", "normal", id) }},
			{subjects.StreamCancels, func(id string) string { return subjects.Cancel("b", id) }},
		} {
			id := fmt.Sprintf("brelayack%s%d", c.name[len(c.name)-1:], i)
			target := t.target(id)
			own := r.ackOnto(ctx, c, target, false)
			eff := r.storedOn(t.stream, target, 0)
			if i == 1 {
				// JOBS is a work queue: the dispatcher takes the ack at once and
				// fails it invalid_request under b; either trace counts.
				eff = anyOf(eff, r.storedOn(subjects.StreamResults, subjects.Result("b", id), 0))
			}
			g1 = append(g1, &relayRow{actor: c.name, action: "publish ack of " + own + " relayed onto " + target,
				effect: eff, after: r.bRuns(id)})
		}
	}
	for _, via := range []string{"registry", "models"} {
		actor := r.w2.name
		if via == "models" {
			actor = pair
		}
		id := "brelayforge" + via
		forged := schemas.ResultMsg{Type: "result", JobID: id, Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
			FinishReason: "stop", Text: "PWNED by relay", WorkerID: "w1", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
		body := mustJSON(forged)
		if err := schemas.Validate(schemas.Result, body); err != nil {
			at.t.Fatalf("forged record is not schema-valid, the attack would be too weak: %v", err)
		}
		g1 = append(g1, r.directRow(ctx, actor, via, "a forged completed record", body, subjects.Result("b", id),
			r.storedOn(subjects.StreamResults, subjects.Result("b", id), 0), r.bRuns(id)))

		seq := delW
		if via == "models" {
			seq = delP
		}
		g1 = append(g1, r.directRow(ctx, actor, via, fmt.Sprintf(`{"seq":%d} (b's record)`, seq), mustJSON(map[string]uint64{"seq": seq}),
			"$JS.API.STREAM.MSG.DELETE.RESULTS", r.msgGone(subjects.StreamResults, seq), nil))

		g1 = append(g1, r.consumerRow(ctx, actor, via))

		job := canW
		if via == "models" {
			job = canP
		}
		cancel := mustJSON(schemas.CancelMsg{JobID: job, Tenant: "b", Reason: "PWNED by relay", RequestedAt: time.Now().UTC()})
		before := r.lastSeq(ctx, subjects.StreamCancels, subjects.Cancel("b", job))
		g1 = append(g1, r.directRow(ctx, actor, via, "a cancel of b's running "+job, cancel, subjects.Cancel("b", job),
			r.storedOn(subjects.StreamCancels, subjects.Cancel("b", job), before), r.bCompletes(job)))
	}
	r.judge(ctx, g1)

	// Group 2: purges, one at a time: each would empty what the next looks at.
	r.judge(ctx, []*relayRow{r.ackPurge(ctx, r.pa)})
	r.judge(ctx, []*relayRow{r.ackPurge(ctx, r.w2)})
	for _, via := range []string{"registry", "models"} {
		actor := r.w2.name
		if via == "models" {
			actor = pair
		}
		r.ensureBRecord(ctx, "brelayfill"+via)
		snap := r.records(ctx, "mlx.results.b.>")
		r.judge(ctx, []*relayRow{r.directRow(ctx, actor, via, `{"filter":"mlx.results.b.>"}`, []byte(`{"filter":"mlx.results.b.>"}`),
			"$JS.API.STREAM.PURGE.RESULTS", r.recordsGone("mlx.results.b.>", snap), nil)})
	}

	// Group 3: w1's registry entry, last (on a stack with the hole w1 is
	// ignored from here on).
	r.registryRows(ctx, pair)
	at.t.Logf("relay rows done in %s", time.Since(start).Round(time.Millisecond))
}

// judge polls every row's effect until all took effect or relayWait passed,
// records the rows, then runs the after checks together.
func (r *relayer) judge(ctx context.Context, rows []*relayRow) {
	hit := make([]string, len(rows))
	done := make([]bool, len(rows))
	wctx, cancel := context.WithTimeout(ctx, relayWait)
	_ = poll(wctx, 25*time.Millisecond, func() bool {
		all := true
		for i, rr := range rows {
			if done[i] || rr.effect == nil {
				continue
			}
			if ok, what := rr.effect(ctx); ok {
				done[i], hit[i] = true, what
				continue
			}
			all = false
		}
		return all
	})
	cancel()
	for i, rr := range rows {
		switch {
		case rr.row != nil: // decided when sent
		case done[i]:
			rr.row = r.at.add(rr.actor, rr.action, false, "SUCCEEDED: "+hit[i])
		default:
			rr.row = r.at.add(rr.actor, rr.action, true, fmt.Sprintf("nothing changed within %s", relayWait))
		}
	}
	var wg sync.WaitGroup
	for _, rr := range rows {
		if rr.after == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			bad, what := rr.after(ctx)
			r.at.mu.Lock()
			defer r.at.mu.Unlock()
			if bad && rr.row.refused {
				rr.row.refused, rr.row.outcome = false, "SUCCEEDED: "+what
			} else {
				rr.row.outcome += "; " + what
			}
		}()
	}
	wg.Wait()
}

// ackOnto: c publishes to a stream it may write — producer a its own valid
// cancel (or job), w2 its own heartbeat as it was — with reply subject
// target: the stream's publish ack is the server's to send there. It returns
// what was published.
func (r *relayer) ackOnto(ctx context.Context, c *busClient, target string, job bool) string {
	r.n++
	id := fmt.Sprintf("atkrelay%d", r.n)
	m := &nats.Msg{Subject: subjects.Cancel("a", id), Reply: target,
		Data: mustJSON(schemas.CancelMsg{JobID: id, Tenant: "a", Reason: "relay", RequestedAt: time.Now().UTC()})}
	what := "its own cancel " + id
	switch {
	case c == r.w2:
		m.Subject, m.Data, what = apiFor(c.name, "$KV."+subjects.BucketWorkers+".w2"), r.w2beat, "its own heartbeat"
	case job:
		m.Subject = subjects.Job("a", "normal", id)
		m.Data = mustJSON(map[string]any{"id": id, "model": r.at.s.modelID(), "prompt": "relay", "max_tokens": 4, "tenant": "a",
			"reply_to": bus.ReplySubject("a", id)})
		what = "its own job " + id
	}
	if err := c.nc.PublishMsg(m); err != nil {
		r.at.t.Fatal(err)
	}
	if err := c.nc.FlushTimeout(5 * time.Second); err != nil {
		r.at.t.Fatal(err)
	}
	return what
}

// ackPurge: a publish ack, {"stream":S,"seq":N}, relayed onto PURGE.RESULTS
// parses as a purge of every record below N. (nats-server 2.15 drops it: the
// API takes no message without client info, which acks lack; direct-get
// answers carry it.)
func (r *relayer) ackPurge(ctx context.Context, c *busClient) *relayRow {
	from := subjects.StreamJobs
	if c == r.w2 {
		from = subjects.WorkersStream
	}
	next, res := r.info(ctx, from).State.LastSeq+1, r.info(ctx, subjects.StreamResults)
	if next <= res.State.FirstSeq {
		r.at.t.Errorf("relay harness: %s's next sequence %d is not above RESULTS' first %d: the relayed ack would purge nothing",
			from, next, res.State.FirstSeq)
	}
	snap := r.records(ctx, subjects.ResultsAll)
	what := r.ackOnto(ctx, c, "$JS.API.STREAM.PURGE.RESULTS", true)
	rr := &relayRow{actor: c.name, action: "publish ack of " + what + " relayed onto $JS.API.STREAM.PURGE.RESULTS",
		effect: r.recordsGone(subjects.ResultsAll, snap)}
	if c != r.pa {
		return rr
	}
	// Not the verdict: that a's job was stored, so there was an ack to relay.
	id := strings.TrimPrefix(what, "its own job ")
	rr.after = func(ctx context.Context) (bool, string) {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if err := poll(wctx, 50*time.Millisecond, func() bool {
			_, err := results.Fetch(wctx, r.at.s.adminJS, "a", id)
			return err == nil
		}); err != nil {
			r.at.t.Errorf("relay harness: a's job %s never ran, so JOBS may have sent no ack to relay", id)
		}
		return false, "a's job " + id + " ran (its ack was sent)"
	}
	return rr
}

// directRow: body is put as a value the attacker may write, and a direct get
// of it names target as reply subject. via "registry": w2's own key, w2's
// direct get; via "models": a models key w2 writes, producer a's direct get.
func (r *relayer) directRow(ctx context.Context, actor, via, what string, body []byte, target string,
	effect, after func(context.Context) (bool, string)) *relayRow {
	rr := &relayRow{actor: actor, effect: effect, after: after,
		action: fmt.Sprintf("direct get of a %s value (%s) relayed onto %s", via, what, target)}
	if err := r.relayValue(ctx, via, body, target); err != nil {
		rr.row = r.at.add(actor, rr.action, true, "refused: "+err.Error())
	}
	return rr
}

func (r *relayer) relayValue(ctx context.Context, via string, body []byte, target string) error {
	if via == "models" {
		r.n++
		key := fmt.Sprintf("atkrelay%d", r.n)
		kv, err := r.w2.js.KeyValue(ctx, subjects.BucketModels)
		if err != nil {
			return fmt.Errorf("the models bucket: %w", err)
		}
		if _, err := kv.Put(ctx, key, body); err != nil {
			return fmt.Errorf("the value: %w", err)
		}
		get := apiFor(r.pa.name, "$JS.API.DIRECT.GET.KV_"+subjects.BucketModels+".$KV."+subjects.BucketModels+"."+key)
		return errors.Join(r.pa.nc.PublishRequest(get, target, nil), r.pa.nc.FlushTimeout(5*time.Second))
	}
	// w2's real process puts its heartbeat on the same key every few seconds:
	// the relay counts only if the get that follows it still answers the
	// value put (values only move forward), else it is sent again.
	key := "$KV." + subjects.BucketWorkers + ".w2"
	get := apiFor(r.w2.name, "$JS.API.DIRECT.GET."+subjects.WorkersStream+"."+key)
	for range 3 {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := r.w2.js.Publish(pctx, apiFor(r.w2.name, key), body)
		cancel()
		if err != nil {
			return fmt.Errorf("the value: %w", err)
		}
		if err := r.w2.nc.PublishRequest(get, target, nil); err != nil {
			return err
		}
		m, err := r.w2.nc.Request(get, nil, time.Second)
		if err != nil || m.Header.Get(jetstream.SequenceHeader) == strconv.FormatUint(ack.Sequence, 10) {
			return nil // unconfirmed (the get is not answered to w2 itself) or confirmed: judged by state
		}
	}
	r.at.t.Errorf("relay harness: w2's heartbeat overwrote the value three times before the relayed get of %s", target)
	return nil
}

// consumerRow: a CONSUMER.CREATE request as the value, relayed onto the API:
// a push consumer of b's records delivering to the attacker (w2's own assign
// subject, or producer a's inbox for the pair).
func (r *relayer) consumerRow(ctx context.Context, actor, via string) *relayRow {
	c := r.w2
	deliver := subjects.Assign("w2")
	if via == "models" {
		c, deliver = r.pa, r.pa.nc.NewInbox()
	}
	// The consumer's deliveries are reply-less messages on deliver: any counts.
	var recv sync.Map
	sub, err := c.nc.Subscribe(deliver, func(m *nats.Msg) { recv.Store("first", m.Subject) })
	if err != nil {
		r.at.t.Fatal(err)
	}
	r.at.t.Cleanup(func() { _ = sub.Unsubscribe() })
	before := r.consumers(ctx)
	req := fmt.Sprintf(`{"stream_name":%q,"config":{"deliver_subject":%q,"ack_policy":"none","deliver_policy":"all","filter_subject":"mlx.results.b.>","inactive_threshold":10000000000}}`,
		subjects.StreamResults, deliver)
	if err := c.nc.FlushTimeout(5 * time.Second); err != nil {
		r.at.t.Fatal(err)
	}
	return r.directRow(ctx, actor, via, "CONSUMER.CREATE of b's records delivering to "+deliver, []byte(req),
		"$JS.API.CONSUMER.CREATE."+subjects.StreamResults, func(ctx context.Context) (bool, string) {
			var made []string
			for name, to := range r.consumers(ctx) {
				if _, old := before[name]; !old && to == deliver {
					made = append(made, name)
				}
			}
			first, got := recv.Load("first")
			if len(made) == 0 && !got {
				return false, ""
			}
			// A real consumer would feed w2's process results as assignments
			// for the rest of the run: deleted once seen.
			s, err := r.at.s.adminJS.Stream(ctx, subjects.StreamResults)
			for _, name := range made {
				if err == nil {
					_ = s.DeleteConsumer(ctx, name)
				}
			}
			return true, fmt.Sprintf("consumer %v made on RESULTS; the attacker received %v", made, first)
		}, nil)
}

// registryRows: relays onto w1's registry key — a's publish ack, and a
// heartbeat naming w1 started far in the future (dispatchers take it for a
// restart of w1 and ignore the real w1's heartbeats). Every value stored on
// the key is watched; one that is not w1's own counts.
func (r *relayer) registryRows(ctx context.Context, pair string) {
	kv, err := r.at.s.adminJS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		r.at.t.Fatal(err)
	}
	e, err := kv.Get(ctx, "w1")
	if err != nil {
		r.at.t.Fatalf("w1's registry entry: %v", err)
	}
	var own schemas.HeartbeatMsg
	if err := json.Unmarshal(e.Value(), &own); err != nil {
		r.at.t.Fatal(err)
	}
	w, err := kv.Watch(ctx, "w1", jetstream.UpdatesOnly())
	if err != nil {
		r.at.t.Fatal(err)
	}
	defer func() { _ = w.Stop() }()
	// Two sources, as the key keeps one value: the watch may skip a value
	// overwritten at once (here by the next relay), the admin's subscription
	// sees every publish the key's stream takes in.
	var mu sync.Mutex
	var foreign []string
	note := func(op string, v []byte) {
		var hb schemas.HeartbeatMsg
		if json.Unmarshal(v, &hb) == nil && hb.WorkerID == "w1" && hb.Hostname == own.Hostname && hb.StartedAt.Equal(own.StartedAt) {
			return
		}
		mu.Lock()
		foreign = append(foreign, fmt.Sprintf("%s %s", op, v))
		mu.Unlock()
	}
	go func() {
		for e := range w.Updates() {
			if e != nil {
				note(e.Operation().String(), e.Value())
			}
		}
	}()
	key := "$KV." + subjects.BucketWorkers + ".w1"
	sub, err := r.at.s.admin.Subscribe(key, func(m *nats.Msg) { note("published", m.Data) })
	if err != nil {
		r.at.t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := r.at.s.admin.Flush(); err != nil {
		r.at.t.Fatal(err)
	}
	seen := func(marker string) func(context.Context) (bool, string) {
		return func(context.Context) (bool, string) {
			mu.Lock()
			defer mu.Unlock()
			for _, v := range foreign {
				if strings.Contains(v, marker) {
					return true, fmt.Sprintf("w1's registry key took a value not w1's: %.160s", v)
				}
			}
			return false, ""
		}
	}
	var rows []*relayRow
	for _, c := range []*busClient{r.pa, r.w2} {
		stream := subjects.StreamCancels
		if c == r.w2 {
			stream = subjects.WorkersStream
		}
		what := r.ackOnto(ctx, c, key, false)
		rows = append(rows, &relayRow{actor: c.name, action: "publish ack of " + what + " relayed onto " + key,
			effect: seen(`"stream":"` + stream + `"`)})
	}
	for _, via := range []string{"registry", "models"} {
		actor := r.w2.name
		if via == "models" {
			actor = pair
		}
		hb := own
		hb.Hostname = "PWNED-relay-" + via
		hb.StartedAt = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
		hb.UpdatedAt = time.Now().UTC()
		rows = append(rows, r.directRow(ctx, actor, via, "a heartbeat of w1 started in 2030", mustJSON(hb), key, seen(hb.Hostname), nil))
	}
	r.judge(ctx, rows)
}

// apiFor is s as the credential of user sends it: an account of its own
// reaches JetStream's API and KV under the imported prefix (bus.NewJetStream).
// The relays' targets stay the JetStream account's own subjects: that is
// where the attack aims.
func apiFor(user, s string) string {
	p := subjects.APIPrefixForUser(user)
	switch {
	case p == "":
		return s
	case strings.HasPrefix(s, "$JS.API."):
		return p + strings.TrimPrefix(s, "$JS.API")
	case strings.HasPrefix(s, "$KV."):
		return p + "." + s
	}
	return s
}
