package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mlx-serving/mlx-serving/internal/jsget"
	"github.com/mlx-serving/mlx-serving/internal/registry"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/schemas"
)

// Attacks on the KV buckets a worker may write: its own registry key and the
// model announcements.

// kvRollup: a put on w1's own registry key with Nats-Rollup: all would purge
// the bucket's other keys (w2's heartbeat).
func (at *attackTable) kvRollup(c *busClient) {
	action := "Nats-Rollup: all on its own heartbeat key"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := at.s.adminJS.KeyValue(ctx, subjects.BucketWorkers)
	if err != nil {
		at.t.Fatal(err)
	}
	own, err := kv.Get(ctx, "w1")
	if err != nil {
		at.t.Fatal(err)
	}
	m := nats.NewMsg("$KV." + subjects.BucketWorkers + ".w1")
	m.Data = own.Value()
	m.Header.Set("Nats-Rollup", "all")
	ack, refusal := at.kvPublish(ctx, c, m)
	if ack == nil {
		at.add(c.name, action, true, refusal)
		return
	}
	kvs, err := at.s.adminJS.Stream(ctx, subjects.WorkersStream)
	if err != nil {
		at.t.Fatal(err)
	}
	last, err := kvs.GetLastMsgForSubject(ctx, "$KV."+subjects.BucketWorkers+".w2")
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		at.add(c.name, action, false, "SUCCEEDED: w2's registry entry erased")
	case err != nil:
		at.t.Fatal(err)
	case last.Sequence > ack.Sequence:
		at.add(c.name, action, false, "SUCCEEDED: w2's registry entry erased (w2 has put a new one since)")
	default:
		at.add(c.name, action, true, "w2's entry survived")
	}
}

// modelsRollup: a worker may announce models, but a put with Nats-Rollup: all
// would erase every other model's announcement, so producers would refuse jobs
// for models that are served (or, the bucket empty, take the fleet for down).
func (at *attackTable) modelsRollup(c *busClient) {
	action := "Nats-Rollup: all on a model announcement"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv := at.announceServed(ctx)
	m := nats.NewMsg(subjects.ModelEntry("atk-other"))
	m.Data = []byte("atk-other")
	m.Header.Set("Nats-Rollup", "all")
	if ack, refusal := at.kvPublish(ctx, c, m); ack == nil {
		at.add(c.name, action, true, refusal)
		return
	}
	if _, err := kv.Get(ctx, subjects.ModelKey("atk-served")); errors.Is(err, jetstream.ErrKeyNotFound) {
		at.add(c.name, action, false, "SUCCEEDED: every other model's announcement erased")
		return
	}
	at.add(c.name, action, true, "the other announcements survived")
}

// modelsTamper: a worker may put model announcements, and NATS permissions
// cannot tell a put from a "KV-Operation: DEL" or "PURGE" marker on the same
// subject, nor keep headers of the writer's own off it. None may make a served
// model unknown to the producers' check, nor make the check fail: a marker
// made it model_not_found for every tenant, and a 500 from the gateway, for as
// long as it was repeated; "Nats-Time-Stamp: garbage" or "Nats-Sequence: xyz"
// made every submit for it fail (bus: model check failed, gateway 503), and an
// empty value with "Status: 404" read as "no message" (red team round 17, F3).
func (at *attackTable) modelsTamper(c, reader *busClient) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	at.announceServed(ctx)
	for _, tc := range []struct {
		action string
		header nats.Header
		data   []byte
	}{
		{"KV-Operation: DEL on another model's announcement", nats.Header{"KV-Operation": {"DEL"}}, nil},
		{"KV-Operation: PURGE on another model's announcement", nats.Header{"KV-Operation": {"PURGE"}}, nil},
		{"Nats-Time-Stamp: garbage on another model's announcement", nats.Header{"Nats-Time-Stamp": {"garbage"}}, []byte("atk-served")},
		{"Nats-Sequence: xyz on another model's announcement", nats.Header{"Nats-Sequence": {"xyz"}}, []byte("atk-served")},
		{"empty value with Status: 404 on another model's announcement", nats.Header{"Status": {"404"}, "Description": {"No Messages"}}, nil},
	} {
		m := nats.NewMsg(subjects.ModelEntry("atk-served"))
		for k, v := range tc.header {
			m.Header[k] = v
		}
		m.Data = tc.data
		if ack, refusal := at.kvPublish(ctx, c, m); ack == nil {
			at.add(c.name, tc.action, true, refusal)
			continue
		}
		served, err := registry.ModelServed(ctx, reader.js, "atk-served")
		switch {
		case err != nil:
			at.add(c.name, tc.action, false, "SUCCEEDED: the producers' model check fails: "+err.Error())
		case !served:
			at.add(c.name, tc.action, false, "SUCCEEDED: atk-served is model_not_found for every tenant")
		default:
			at.add(c.name, tc.action, true, "allowed by the server, but atk-served is still served")
		}
	}
}

// modelsFlood: a worker may put any key of the models bucket; unbounded, 60
// values of 1 MB under random keys were stored at 304 MB/s (red team R3-2),
// and a full disk stops JetStream for every tenant. A value larger than a
// model name can be must be refused.
func (at *attackTable) modelsFlood(c *busClient) {
	action := "1 MB value under a random models key (filling the disk)"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m := nats.NewMsg(subjects.ModelEntry("atk-flood"))
	m.Data = make([]byte, 1<<20-4096)
	if ack, refusal := at.kvPublish(ctx, c, m); ack == nil {
		at.add(c.name, action, true, refusal)
		return
	}
	at.add(c.name, action, false, "SUCCEEDED: 1 MB stored in the models bucket")
}

// kvPublish publishes m on a KV subject as c's own KV API would: a client in
// an account of its own writes KV keys under its JetStream API prefix
// (subjects.ImportedAPIPrefix), and a raw publish on "$KV.<bucket>.<key>"
// there reaches no stream. These rows published there once and timed out
// waiting for an ack, which they counted as a refusal: every attack on the
// buckets was "refused" without reaching a bucket. It returns the ack of a
// stored message, or nil and the server's refusal; anything else (no answer)
// fails the test: a timeout is no verdict.
func (at *attackTable) kvPublish(ctx context.Context, c *busClient, m *nats.Msg) (*jetstream.PubAck, string) {
	if p := jsget.APIPrefix(c.js); p != jetstream.DefaultAPIPrefix {
		m.Subject = p + m.Subject
	}
	ack, err := c.js.PublishMsg(ctx, m)
	var apiErr *jetstream.APIError
	switch {
	case err == nil:
		return ack, ""
	case errors.As(err, &apiErr):
		return nil, "refused by JetStream: " + err.Error()
	}
	at.t.Fatalf("%s: publish on %s: %v (neither stored nor refused)", c.name, m.Subject, err)
	return nil, ""
}

// announceServed announces atk-served as the admin (a worker serving it would)
// and returns the models bucket.
func (at *attackTable) announceServed(ctx context.Context) jetstream.KeyValue {
	kv, err := at.s.adminJS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		at.t.Fatal(err)
	}
	if err := registry.AnnounceModels(ctx, kv, []string{"atk-served"}); err != nil {
		at.t.Fatal(err)
	}
	return kv
}

// relayRecord is the red team's N1: worker w1 writes a terminal record for a
// job running on w2 as a value of the models bucket (any key is its to
// write), and producer a, allowed direct gets there for its model check,
// names w2's done subject as the reply subject of a direct get of it, with
// no headers: the server publishes the record there itself. The dispatcher
// must drop it (no reply subject) and count it relayed; checkB then finds b's
// record is w2's own.
func (at *attackTable) relayRecord(ctx context.Context, writer, relayer *busClient, did, tenant, id string, attempt int) {
	action := fmt.Sprintf("record for %s/%s (on w2) put as a models value by %s, relayed onto %s by %s's direct get",
		tenant, id, writer.name, subjects.Done("w2", did), relayer.name)
	kv, err := writer.js.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		at.t.Fatal(err)
	}
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: tenant, Attempt: attempt, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by relay", WorkerID: "w2", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
	if _, err := kv.Put(ctx, "atkrelay", mustJSON(res)); err != nil {
		at.add(writer.name+"+"+relayer.name, action, true, "the value was refused: "+err.Error())
		return
	}
	before, err := at.s.metric(`mlx_dispatcher_anomalies_total{kind="relayed_message"}`)
	if err != nil {
		before = 0
	}
	// What reaches the dispatchers' account on w2's done subject (admin's view).
	seen, err := at.s.admin.SubscribeSync(subjects.Done("w2", did))
	if err != nil {
		at.t.Fatal(err)
	}
	defer func() { _ = seen.Unsubscribe() }()
	_ = at.s.admin.Flush()
	// The relayer's own grant (its account's imported API prefix).
	get := subjects.ImportedAPIPrefix + ".DIRECT.GET.KV_" + subjects.BucketModels + ".$KV." + subjects.BucketModels + ".atkrelay"
	if err := relayer.nc.PublishRequest(get, subjects.Done("w2", did), []byte(`{"no_hdr":true}`)); err != nil {
		at.t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err = poll(rctx, 20*time.Millisecond, func() bool {
		v, err := at.s.metric(`mlx_dispatcher_anomalies_total{kind="relayed_message"}`)
		return err == nil && v > before
	})
	if err == nil {
		at.add(writer.name+"+"+relayer.name, action, true, "dropped, counted relayed")
		return
	}
	// w2's own hand-over of along1 may pass too: it is a request (a reply
	// subject); a relayed answer has none.
	for {
		m, err := seen.NextMsg(10 * time.Millisecond)
		if err != nil {
			break
		}
		if m.Reply == "" {
			at.add(writer.name+"+"+relayer.name, action, false, fmt.Sprintf("SUCCEEDED: reached the dispatchers (%d bytes), not counted as relayed", len(m.Data)))
			return
		}
	}
	at.add(writer.name+"+"+relayer.name, action, true, "the answer stayed in the relayer's account: nothing reached the dispatchers")
}

// deputy is the red team's R5-1: w1 hands over a record for b's queued job
// on its own done subject, naming as reply subject that job's RESULTS
// subject. The dispatcher must refuse the record and not answer there (its
// answer would go out with its grants and be stored as b's record); checkB
// then finds b's job ended with its own completed run.
func (at *attackTable) deputy(ctx context.Context, c *busClient, did, id string) {
	action := fmt.Sprintf("request %s with reply subject %s (the dispatcher's answer as b's record)", subjects.Done("w1", did), subjects.Result("b", id))
	res := schemas.ResultMsg{Type: "result", JobID: id, Tenant: "b", Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		FinishReason: "stop", Text: "PWNED by deputy", WorkerID: "w1", Model: at.s.modelID(), FinishedAt: time.Now().UTC()}
	before := at.forged()
	if err := c.nc.PublishRequest(subjects.Done("w1", did), subjects.Result("b", id), mustJSON(res)); err != nil {
		at.t.Fatal(err)
	}
	// Under auth the worker's request crosses into the dispatchers' account
	// and its answer goes back into the worker's own account, where nothing
	// stores mlx.results: answered or not, no record may appear for id. The
	// window is the forged counter's (3 s): an answer comes in milliseconds.
	counted := at.waitForged(before, 3*time.Second)
	// b's own run of id may end within the window and write its record: the
	// dispatcher's answer is a finish reply ({"job_id","tenant","status"}),
	// no record ("type":"result").
	stored, err := results.Stored(ctx, at.s.adminJS, "b", id)
	var rec struct {
		Type string `json:"type"`
	}
	switch {
	case err == nil && (json.Unmarshal(stored, &rec) != nil || rec.Type != "result"):
		at.add(c.name, action, false, "SUCCEEDED: the dispatcher's answer was stored as "+id+"'s record: "+string(stored))
	case counted:
		at.add(c.name, action, true, "refused, not answered, counted forged")
	default:
		at.add(c.name, action, true, "answered into the worker's own account only; no record for "+id)
	}
}
