// Package auth generates the bus credentials of every role (producer per tenant,
// dispatcher, worker per worker id, gateway, admin) and the server-side
// authorization that goes with them: which subjects each role may publish and
// subscribe to. `mlx-serving auth init` writes them under DATA_DIR/auth; `up`
// starts its embedded server with them and connects each part as its role.
package auth

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/mlx-serving/mlx-serving/internal/subjects"
	"github.com/nats-io/nats-server/v2/server"
)

// Role is what a credential may do on the bus.
type Role string

const (
	// RoleProducer submits and cancels jobs of one tenant and reads that tenant's
	// token streams.
	RoleProducer Role = "producer"
	// RoleGateway is a producer for every tenant it maps bearer tokens to.
	RoleGateway Role = "gateway"
	// RoleDispatcher owns the streams and consumers and routes batches to workers.
	RoleDispatcher Role = "dispatcher"
	// RoleWorker serves one worker id's assignments.
	RoleWorker Role = "worker"
	// RoleAdmin may do anything (status, replay, provisioning by hand).
	RoleAdmin Role = "admin"
)

// Roles lists every role, in the order auth init writes them.
var Roles = []Role{RoleAdmin, RoleDispatcher, RoleGateway, RoleWorker, RoleProducer}

// ErrInvalidName is returned for a tenant or worker id that cannot be one subject
// token: permissions are written per token, so a dot or a wildcard in a name would
// grant more than that name.
var ErrInvalidName = errors.New("auth: invalid name")

// Identity is who a credential belongs to: the role and, for producers the
// tenant, for workers the worker id.
type Identity struct {
	Role     Role   `json:"role"`
	User     string `json:"user"`
	Tenant   string `json:"tenant,omitempty"`
	WorkerID string `json:"worker_id,omitempty"`
}

// Permissions are the subjects one identity may publish and subscribe to.
// AllowResponses lets it answer requests it received (any reply subject, once,
// within a minute) without a publish grant on every requester's inbox.
type Permissions struct {
	PublishAllow   []string `json:"publish_allow"`
	SubscribeAllow []string `json:"subscribe_allow"`
	AllowResponses bool     `json:"allow_responses,omitempty"`
}

// JetStream API and KV subjects. The producer-side grants are the exact API calls
// bus.Client and bus.JobStream make: publishing a job or cancel needs none (the
// publish ack comes back on the client's inbox), reading a result needs one
// direct get, whose subject names the record's subject and so its tenant.
const jsAPI = "$JS.API"

// modelReads are the calls registry.ModelServed makes: bind the bucket, get one key,
// count the keys. They reveal only which models are served (keys are hashes).
var modelReads = []string{
	streamInfo(subjects.ModelsStream),
	directGet(subjects.ModelsStream, "$KV."+subjects.BucketModels+".*"),
}

func streamInfo(stream string) string { return jsAPI + ".STREAM.INFO." + stream }

// directGet is the direct get of the last message on subjects (a wildcard
// pattern) of stream. A STREAM.MSG.GET names its subject in the request body,
// where no permission can see it, so it is granted to nobody but the dispatcher
// and admin: it would read any tenant's records.
func directGet(stream, subjects string) string {
	return jsAPI + ".DIRECT.GET." + stream + "." + subjects
}

// resultReads are the calls results.Fetch makes for tenant's records; every
// tenant's for "".
func resultReads(tenant string) []string {
	if tenant == "" {
		return []string{directGet(subjects.StreamResults, subjects.ResultsAll)}
	}
	return []string{directGet(subjects.StreamResults, subjects.ResultsTenant(tenant))}
}

// registryReads are the calls registry.Snapshot and registry.Get make: bind
// the bucket's stream and list its keys (STREAM.INFO), then a direct get of
// each key's last message. No consumer grant: a consumer's deliver subject is
// in the request body, where no permission can see it, and the server pushes
// deliveries there whatever the creator may publish on — with CONSUMER.CREATE
// here the gateway could replay a value a worker wrote into the bucket onto
// another worker's assign subject (the red team's R3-1).
var registryReads = []string{
	streamInfo(subjects.WorkersStream),
	directGet(subjects.WorkersStream, subjects.WorkerEntries+">"),
}

// InboxPrefix is the inbox prefix of a user's connection: replies (publish acks,
// API answers, request replies) come back under it, and a restricted user may
// subscribe only there, so nobody reads another client's replies. It stays under
// _INBOX, so users of servers configured otherwise lose nothing. It is empty for
// a user name that is not one subject token (then the default inbox is used).
func InboxPrefix(user string) string {
	if ValidName(user) != nil {
		return ""
	}
	return inboxRoot + user
}

// inboxRoot is nats.go's default inbox prefix with its dot.
const inboxRoot = "_INBOX."

// ValidName checks that name can be one subject token of at most 64 characters
// of letters, digits, '-' and '_' (what the job schema allows for a tenant).
func ValidName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("%w: %q must be 1 to 64 characters", ErrInvalidName, name)
	}
	for _, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
		default:
			return fmt.Errorf("%w: %q may hold only letters, digits, '-' and '_'", ErrInvalidName, name)
		}
	}
	return nil
}

// ValidTenant checks a tenant against the job schema's pattern, so a producer's
// jobs can name the tenant its credential is for.
func ValidTenant(tenant string) error {
	if err := ValidName(tenant); err != nil {
		return err
	}
	if c := tenant[0]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') || strings.ToLower(tenant) != tenant {
		return fmt.Errorf("%w: tenant %q must be lower case and start with a letter or digit", ErrInvalidName, tenant)
	}
	return nil
}

// PermissionsFor returns the grants of id. Everything not granted is refused by
// the server: a producer cannot publish assignments, read another tenant's
// replies or touch the streams' configuration; a worker cannot subscribe to
// another worker's assignments.
func PermissionsFor(id Identity) (Permissions, error) {
	p, err := grantsFor(id)
	if err != nil || AccountOf(id) == AccountSystem {
		return p, err
	}
	// In an account of its own the JetStream calls and KV writes go out under
	// the imported API prefix (accounts.go): grant them there.
	for i, s := range p.PublishAllow {
		p.PublishAllow[i] = localAPI(s)
	}
	return p, nil
}

// localAPI is where a client in an account of its own sends subject s of
// the JetStream account: $JS.API.<x> and $KV.<x> under the imported prefix,
// anything else unchanged. systemAPI is its inverse.
func localAPI(s string) string {
	switch {
	case strings.HasPrefix(s, jsAPI+"."):
		return subjects.ImportedAPIPrefix + strings.TrimPrefix(s, jsAPI)
	case strings.HasPrefix(s, "$KV."):
		return subjects.ImportedAPIPrefix + "." + s
	}
	return s
}

func systemAPI(s string) string {
	rest, ok := strings.CutPrefix(s, subjects.ImportedAPIPrefix+".")
	switch {
	case !ok:
		return s
	case strings.HasPrefix(rest, "$KV."):
		return rest
	}
	return jsAPI + "." + rest
}

// grantsFor is PermissionsFor in the JetStream account's subjects.
func grantsFor(id Identity) (Permissions, error) {
	if err := ValidName(id.User); err != nil {
		return Permissions{}, err
	}
	inbox := InboxPrefix(id.User) + ".>"
	switch id.Role {
	case RoleAdmin:
		return Permissions{PublishAllow: []string{">"}, SubscribeAllow: []string{">"}, AllowResponses: true}, nil
	case RoleProducer:
		// Every grant names the tenant's token, so the server refuses another
		// tenant's jobs, cancels, replies and records whatever a message says.
		if err := ValidTenant(id.Tenant); err != nil {
			return Permissions{}, err
		}
		return Permissions{
			PublishAllow: slices.Concat([]string{subjects.JobsTenant(id.Tenant), subjects.CancelTenant(id.Tenant)},
				resultReads(id.Tenant), modelReads),
			SubscribeAllow: []string{subjects.ReplyNamespace(id.Tenant), inbox},
		}, nil
	case RoleGateway:
		pub := []string{subjects.JobsAnyTenant, subjects.CancelAnyTenant, // not the dispatchers' wake-up (JobsStored)
			streamInfo(subjects.StreamJobs), streamInfo(subjects.StreamResults), streamInfo(subjects.StreamCancels), // readiness
			streamInfo(subjects.StreamDLQ)} // the fleet gauges (metrics.Fleet) it serves on /metrics
		pub = append(pub, resultReads("")...)
		pub = append(pub, registryReads...)
		pub = append(pub, modelReads...)
		return Permissions{PublishAllow: pub, SubscribeAllow: []string{subjects.ReplyPrefix + ".>", inbox}}, nil
	case RoleWorker:
		// A worker reads its own assignments and the cancels of the jobs it runs
		// (forwarded by their dispatcher), streams token events, and hands each
		// terminal record to the dispatcher that placed the job: it cannot write
		// or read RESULTS, and its worker id is in every subject it may publish
		// on, so a dispatcher knows which worker speaks.
		if err := ValidName(id.WorkerID); err != nil {
			return Permissions{}, err
		}
		return Permissions{
			PublishAllow: []string{
				subjects.ReplyPrefix + ".>",              // token events of the jobs it runs
				subjects.DoneFromWorker(id.WorkerID),     // terminal records, to their dispatcher
				subjects.Adopt(id.WorkerID),              // or to any, with the placement token, when it is gone
				subjects.Attempt(id.WorkerID),            // retryable failures
				subjects.ProgressFromWorker(id.WorkerID), // copies of its token events, to their dispatcher
				subjects.WorkerEntries + id.WorkerID,     // its own heartbeat (put and delete)
				streamInfo(subjects.WorkersStream),       // binding the registry bucket
				// Reading its own entry at start: is another process heart-beating
				// under this id (worker/idclaim.go)? Its own key only: a value it
				// could relay with it is one it writes itself, as models values
				// are for the producers' direct gets.
				directGet(subjects.WorkersStream, subjects.WorkerEntries+id.WorkerID),
				"$KV." + subjects.BucketModels + ".*", // announcing the models it serves
				streamInfo(subjects.ModelsStream),     // binding that bucket
			},
			SubscribeAllow: []string{subjects.Assign(id.WorkerID), subjects.WorkerCancel(id.WorkerID), inbox},
			AllowResponses: true, // answering the dispatcher's assign requests
		}, nil
	case RoleDispatcher:
		return Permissions{
			PublishAllow: []string{
				jsAPI + ".>", // provisioning, consumers, pulls, message gets, the registry
				"$JS.ACK.>", "$JS.FC.>",
				subjects.AssignAll, subjects.WorkerCancelAll, subjects.ReplyPrefix + ".>", subjects.ResultsAll, subjects.DLQAll, subjects.LedgerAll,
			},
			// No subscription on reply subjects: every worker credential may
			// publish there, so what a dispatcher tracks of a running attempt
			// comes from the progress subjects, where the server vouches for
			// the worker id.
			SubscribeAllow: []string{subjects.JobsAll,
				subjects.DoneAll, subjects.AdoptAll, subjects.AttemptAll, subjects.ProgressAll, inbox},
			AllowResponses: true, // answering workers' terminal hand-overs
		}, nil
	}
	return Permissions{}, fmt.Errorf("auth: unknown role %q", id.Role)
}

// responseTTL bounds how long a received request may be answered.
const responseTTL = time.Minute

// ServerUser turns a user with its (bcrypt-hashed or plain) password and
// permissions into the embedded server's form.
func ServerUser(user, password string, p Permissions) *server.User {
	perms := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: append([]string(nil), p.PublishAllow...)},
		Subscribe: &server.SubjectPermission{Allow: append([]string(nil), p.SubscribeAllow...)},
	}
	if p.AllowResponses {
		perms.Response = &server.ResponsePermission{MaxMsgs: 1, Expires: responseTTL}
	}
	return &server.User{Username: user, Password: password, Permissions: perms}
}

// userName is the user of a role's credential: the role, plus the tenant or
// worker id that scopes it.
func userName(role Role, name string) string {
	if name == "" {
		return string(role)
	}
	return string(role) + "-" + name
}
