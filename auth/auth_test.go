package auth

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/crypto/bcrypt"

	"github.com/mlx-serving/mlx-serving/bus"
	"github.com/mlx-serving/mlx-serving/internal/results"
	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/mlx-serving/mlx-serving/internal/testenv"
	"github.com/mlx-serving/mlx-serving/schemas"
)

func TestInitWritesOwnerOnlyFilesAndRefusesToOverwrite(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	store, err := Init(InitOptions{DataDir: dir, Tenants: []string{"acme"}, WorkerIDs: []string{"mac1"}, BcryptCost: 4})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"admin", "dispatcher", "gateway", "producer-acme", "worker-mac1"}
	var got []string
	for _, id := range store.Identities() {
		got = append(got, id.User)
	}
	if len(got) != len(want) {
		t.Fatalf("users %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("users %v, want %v", got, want)
		}
	}
	entries, err := os.ReadDir(Dir(dir))
	if err != nil {
		t.Fatal(err)
	}
	// One credential per user, the server file and the two nats-server includes.
	if len(entries) != len(want)+3 {
		t.Fatalf("%d files in %s, want %d", len(entries), Dir(dir), len(want)+3)
	}
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", e.Name(), fi.Mode().Perm())
		}
	}
	// The server file keeps hashes only.
	raw, err := os.ReadFile(filepath.Join(Dir(dir), serverFile))
	if err != nil {
		t.Fatal(err)
	}
	c, err := store.Credential(RoleProducer, "acme")
	if err != nil {
		t.Fatal(err)
	}
	if c.Password == "" || strings.Contains(string(raw), c.Password) {
		t.Fatalf("server file holds the producer's password (or the password is empty)")
	}
	if c.InboxPrefix != "_INBOX.producer-acme" || c.Tenant != "acme" {
		t.Fatalf("credential %+v", c)
	}
	if _, err := Init(InitOptions{DataDir: dir, WorkerIDs: []string{"mac1"}, BcryptCost: 4}); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v, want ErrExists", err)
	}
	if _, err := store.Credential(RoleProducer, "other"); !errors.Is(err, ErrNoCredential) {
		t.Fatalf("unknown tenant: %v, want ErrNoCredential", err)
	}
}

func TestInitRejectsNamesThatAreNotOneSubjectToken(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"a.b", "A", "-a", "*", ">", "a b", ""} {
		dir := t.TempDir()
		if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{name}, WorkerIDs: []string{"w"}, BcryptCost: 4}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("tenant %q: %v, want ErrInvalidName", name, err)
		}
		if Exists(dir) {
			t.Errorf("tenant %q: credentials written despite the error", name)
		}
	}
}

func TestUnauthenticatedClientIsRefused(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	ctx := testenv.Context(t, 10*time.Second)
	_, err := bus.Connect(ctx, bus.ConnectOptions{URLs: []string{sb.srv.ClientURL()}})
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("connect without credentials: %v, want an authorization error", err)
	}
	opts := sb.options(RoleProducer, "a")
	opts.Password = "wrong"
	if _, err := bus.Connect(ctx, opts); !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("connect with a wrong password: %v, want an authorization error", err)
	}
}

func TestProducerCannotPublishAssignments(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	admin := sb.connect(RoleAdmin, "")
	seen := make(chan string, 4)
	for _, subj := range []string{"mlx.worker.x.assign", "mlx.cancel.>"} {
		if _, err := admin.nc.Subscribe(subj, func(m *nats.Msg) { seen <- m.Subject }); err != nil {
			t.Fatal(err)
		}
	}
	if err := admin.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	prod := sb.connect(RoleProducer, "a")
	if err := prod.nc.Publish("mlx.worker.x.assign", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	// A permitted publish after the refused one: the admin receives messages of
	// one publisher in order, so seeing this one first proves the other was dropped.
	if err := prod.nc.Publish("mlx.cancel.a.marker", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	prod.violation(t, "Publish", "mlx.worker.x.assign")
	select {
	case subj := <-seen:
		if subj != "mlx.cancel.a.marker" {
			t.Fatalf("admin received %s from a producer", subj)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the permitted marker never arrived")
	}
}

func TestProducerCannotReadAnotherTenantsReplies(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	prod := sb.connect(RoleProducer, "a")
	if _, err := prod.nc.SubscribeSync("mlx.reply.b.>"); err != nil {
		t.Fatal(err)
	}
	prod.violation(t, "Subscription", "mlx.reply.b.>")
	// Nor everyone's inboxes, where API answers (results!) travel.
	if _, err := prod.nc.SubscribeSync("_INBOX.>"); err != nil {
		t.Fatal(err)
	}
	prod.violation(t, "Subscription", "_INBOX.>")
}

func TestProducerSubmitsAndStreamsItsOwnJob(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	prodConn := sb.connect(RoleProducer, "a")
	p, err := bus.NewClient(prodConn.nc, bus.WithTenant("a"), bus.WithDefaultModel("tiny"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Context(t, 30*time.Second)

	// A worker credential streams a token event on the reply subject; the
	// dispatcher's writes the terminal record to RESULTS and sends its event
	// (results.Finish), as it does for a record a worker handed it.
	wk := sb.connect(RoleWorker, "w1")
	wjs := mustJS(t, sb.connect(RoleDispatcher, "").nc)
	job := &schemas.JobRequest{Prompt: "hi"}
	stream, ack, err := bus.SubmitStream(ctx, p, prodConn.nc, job, bus.StreamOptions{QuietAfter: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if ack.ReplyTo != "mlx.reply.a."+ack.JobID {
		t.Fatalf("reply subject %s", ack.ReplyTo)
	}
	tok, _ := json.Marshal(schemas.TokenEventMsg{Type: "token", JobID: ack.JobID, Attempt: 1, Seq: 0, Delta: "hel"})
	if err := wk.nc.Publish(ack.ReplyTo, tok); err != nil {
		t.Fatal(err)
	}
	// The token and the terminal come over two connections: the flush makes the
	// server route the token before the terminal is published, as a real
	// worker's events precede its hand-over to the dispatcher.
	if err := wk.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	res := &schemas.ResultMsg{Type: "result", JobID: ack.JobID, Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
		Text: "hello", FinishReason: "stop", Model: "tiny", Tenant: "a", FinishedAt: now}
	if err := results.Finish(ctx, wjs, res, ack.ReplyTo); err != nil {
		t.Fatalf("dispatcher records a result: %v", err)
	}
	// A retry after a lost ack reads the stored record to see it is its own.
	if err := results.Record(ctx, wjs, res); err != nil {
		t.Fatalf("dispatcher retries its own record: %v", err)
	}
	var texts []string
	for ev, err := range stream.Events(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		if ev.Token != nil {
			texts = append(texts, ev.Token.Delta)
		}
		if ev.Result != nil {
			if ev.Result.Text != "hello" || ev.Result.Status != schemas.StatusCompleted {
				t.Fatalf("result %+v", ev.Result)
			}
		}
	}
	if len(texts) != 1 || texts[0] != "hel" {
		t.Fatalf("token deltas %v", texts)
	}
	// The producer reads the durable result and cancels with its own grants.
	if _, err := results.Fetch(ctx, p.JetStream(), "a", ack.JobID); err != nil {
		t.Fatalf("producer fetches its result: %v", err)
	}
	if err := p.Cancel(ctx, ack.JobID, "test"); err != nil {
		t.Fatalf("producer cancels: %v", err)
	}
	select {
	case err := <-prodConn.errs:
		t.Fatalf("producer got an async error: %v", err)
	default:
	}
}

// A producer reads its own tenant's results by job id and nobody else's: not by
// direct get on another tenant's subject, not by STREAM.MSG.GET (whose subject
// is in the body), not by smuggling a subject into the body of a direct get it
// is allowed to make, and not by listing RESULTS' subjects.
func TestProducerCannotReadAnotherTenantsResults(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	ctx := testenv.Context(t, 60*time.Second)
	wjs := mustJS(t, sb.connect(RoleDispatcher, "").nc)
	for _, r := range []struct{ tenant, id, text string }{{"a", "job-a", "for a"}, {"b", "job-b", "for b"}} {
		res := &schemas.ResultMsg{Type: "result", JobID: r.id, Attempt: 1, Seq: 1, Status: schemas.StatusCompleted,
			Text: r.text, FinishReason: "stop", Model: "tiny", Tenant: r.tenant, FinishedAt: time.Now().UTC()}
		if err := results.Record(ctx, wjs, res); err != nil {
			t.Fatal(err)
		}
	}

	prod := sb.connect(RoleProducer, "a")
	p, err := bus.NewClient(prod.nc, bus.WithTenant("a"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Result(ctx, "job-a"); err != nil || got.Text != "for a" {
		t.Fatalf("producer a reads its own result: %+v, %v", got, err)
	}
	if got, err := results.Fetch(ctx, p.JetStream(), "a", "job-a"); err != nil || got.Text != "for a" {
		t.Fatalf("results.Fetch of its own result: %+v, %v", got, err)
	}
	if _, err := results.Fetch(ctx, p.JetStream(), "a", "job-b"); !errors.Is(err, bus.ErrNoResult) {
		t.Fatalf("tenant b's job under tenant a: err = %v, want ErrNoResult", err)
	}

	// Refused publishes get no answer, so each read is bounded by a short ctx;
	// the server's permission violation is the proof.
	short := func() context.Context {
		c, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		t.Cleanup(cancel)
		return c
	}
	got, err := p.TenantResult(short(), "b", "job-b")
	if err == nil {
		t.Fatalf("producer a read tenant b's result: %+v", got)
	}
	prod.violation(t, "Publish", subjects.ImportedAPIPrefix+".DIRECT.GET.RESULTS."+subjects.Result("b", "job-b"))

	body := []byte(`{"last_by_subj":"` + subjects.Result("b", "job-b") + `"}`)
	if m, err := prod.nc.RequestWithContext(short(), "$JS.API.STREAM.MSG.GET.RESULTS", body); err == nil {
		t.Fatalf("STREAM.MSG.GET answered a producer: %s", m.Data)
	}
	prod.violation(t, "Publish", "$JS.API.STREAM.MSG.GET.RESULTS")

	// The direct get of a subject it may read, with another tenant's subject in
	// the body: the server answers from the request subject or refuses, never
	// from the body.
	m, err := prod.nc.RequestWithContext(ctx, subjects.ImportedAPIPrefix+".DIRECT.GET.RESULTS."+subjects.Result("a", "job-a"), body)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(m.Data), "for b") {
		t.Fatalf("a body naming tenant b's subject was honoured: %s", m.Data)
	}

	// Nor may it list RESULTS' subjects, which are every tenant's job ids.
	if _, err := prod.nc.RequestWithContext(short(), "$JS.API.STREAM.INFO.RESULTS", []byte(`{"subjects_filter":">"}`)); err == nil {
		t.Fatal("STREAM.INFO answered a producer")
	}
	prod.violation(t, "Publish", "$JS.API.STREAM.INFO.RESULTS")

	// Tenant b's producer reads its own.
	pb, err := bus.NewClient(sb.connect(RoleProducer, "b").nc, bus.WithTenant("b"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := pb.Result(ctx, "job-b"); err != nil || got.Text != "for b" {
		t.Fatalf("producer b reads its own result: %+v, %v", got, err)
	}
}

// Mutation caught: granting the worker subjects.AssignAll instead of its own
// subjects.Assign in PermissionsFor.
func TestWorkerServesOnlyItsOwnAssignSubject(t *testing.T) {
	t.Parallel()
	sb := startSecureBus(t)
	w1 := sb.connect(RoleWorker, "w1")
	if err := w1.nc.Publish(subjects.Assign("w2"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	w1.violation(t, "Publish", subjects.Assign("w2"))
	if _, err := w1.nc.SubscribeSync(subjects.Assign("w2")); err != nil {
		t.Fatal(err)
	}
	w1.violation(t, "Subscription", subjects.Assign("w2"))
	// Its own heartbeat key only.
	// (In its account the bucket's keys are written under the imported API
	// prefix, as nats.go's KV does there.)
	other := subjects.ImportedAPIPrefix + ".$KV.mlx_workers.w2"
	if err := w1.nc.Publish(other, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	w1.violation(t, "Publish", other)

	// The dispatcher's request reaches w1 and w1 may answer it, once.
	disp := sb.connect(RoleDispatcher, "")
	if _, err := w1.nc.Subscribe(subjects.Assign("w1"), func(m *nats.Msg) { _ = m.Respond([]byte(`ok`)) }); err != nil {
		t.Fatal(err)
	}
	if err := w1.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	reply, err := disp.nc.Request(subjects.Assign("w1"), []byte(`{}`), 10*time.Second)
	if err != nil || string(reply.Data) != "ok" {
		t.Fatalf("dispatcher → w1 request: %v %v", reply, err)
	}
}

func TestPermissionsForRejectsUnknownRoles(t *testing.T) {
	t.Parallel()
	if _, err := PermissionsFor(Identity{Role: "root", User: "x"}); err == nil {
		t.Fatal("unknown role accepted")
	}
	if _, err := PermissionsFor(Identity{Role: RoleWorker, User: "worker-x", WorkerID: "*"}); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("wildcard worker id: %v", err)
	}
}

func mustJS(t *testing.T, nc *nats.Conn) jetstream.JetStream {
	t.Helper()
	js, err := bus.NewJetStream(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// Adding a worker and a tenant with KeepPasswords leaves every other
// identity's password (credential file and hash) and the routes' password as
// they were, and gives the new ones passwords; retiring a worker the same way
// removes its user and its credential file. With Force every password
// changed, the dispatchers' too, and a rolling restart mixed placement keys
// (red team round 20).
// Mutation caught: Init ignoring the kept passwords (every credential new): red.
func TestKeepPasswordsAddsAndRetiresOnlyThoseNamed(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	read := func(name string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(Dir(dir), name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a"}, WorkerIDs: []string{"w1", "w2"}, BcryptCost: 4}); err != nil {
		t.Fatal(err)
	}
	before := map[string]string{}
	for _, f := range []string{"dispatcher.json", "gateway.json", "admin.json", "worker-w1.json", "producer-a.json", NATSClusterFile} {
		before[f] = read(f)
	}
	if _, err := Init(InitOptions{DataDir: dir, Tenants: []string{"a", "b"}, WorkerIDs: []string{"w1", "w3"}, BcryptCost: 4, KeepPasswords: true}); err != nil {
		t.Fatal(err)
	}
	for f, was := range before {
		if now := read(f); now != was {
			t.Errorf("%s changed:\n%s\nwas\n%s", f, now, was)
		}
	}
	store, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, who := range []struct {
		role Role
		name string
	}{{RoleDispatcher, ""}, {RoleWorker, "w1"}, {RoleWorker, "w3"}, {RoleProducer, "b"}} {
		c, err := store.Credential(who.role, who.name)
		if err != nil {
			t.Fatalf("%s %s: %v", who.role, who.name, err)
		}
		var hash string
		for _, u := range store.doc.Users {
			if u.User == c.User {
				hash = u.PasswordHash
			}
		}
		if bcrypt.CompareHashAndPassword([]byte(hash), []byte(c.Password)) != nil {
			t.Errorf("%s: its credential's password does not match the server's hash", c.User)
		}
	}
	if _, err := os.Stat(filepath.Join(Dir(dir), "worker-w2.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the retired worker's credential file: %v, want it removed", err)
	}
	for _, id := range store.Identities() {
		if id.User == "worker-w2" {
			t.Error("the retired worker is still a user")
		}
	}
}
