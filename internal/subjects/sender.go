package subjects

import "strings"

// Sent reports whether a message that arrived on a worker's or a dispatcher's
// own subject (mlx.worker.<id>.assign, .cancel, .done.<dispatcher>, .attempt,
// .progress.<dispatcher>.<tenant>) can have been published there by a client:
// it carries a reply subject.
//
// Why that matters: JetStream answers an API request on whatever reply
// subject the requester names, and the server publishes that answer itself,
// whatever the requester may publish on. A direct get is such a request, and
// its answer is a stored message's body — headers too, unless the request
// asks for none ("no_hdr"). So any credential allowed to read a store another
// credential can write becomes a relay: a worker credential puts a forged
// record as a value of the models bucket, a producer direct-gets it with
// mlx.worker.w1.done.<dispatcher> as the reply subject, and the dispatcher
// receives it on that literal subject as if w1 had sent it (the red team's
// N1). The server sends such answers, like every response, without a reply
// subject of their own; a consumer's deliveries do carry one but keep the
// subject they were stored under, which no stream here has under mlx.worker.
//
// So every message on these subjects is published with a reply subject:
// assignments and hand-overs are requests anyway; cancels, attempt reports
// and progress events, which nobody answers, go out with a reply subject under
// their sender's own inbox prefix (nats.Conn.NewInbox: only it may subscribe
// there), never answered, and receivers drop what comes without one.
func Sent(reply string) bool { return reply != "" }

// Answerable reports whether a responder may answer a request on reply: only
// under the inbox root every client's replies come back to (nats.go's default
// "_INBOX.", which auth.InboxPrefix stays under). A reply subject is the
// requester's to choose, but the answer goes out with the responder's
// grants: a dispatcher answering a worker's hand-over on whatever subject
// the worker named published, with its own rights, a schema-valid
// {"job_id","tenant","status"} onto mlx.results.<tenant>.<id> and so became
// another tenant's first, stored record (the red team's R5-1). An inbox
// subject reaches only a client waiting on that exact, unguessable subject.
// A request from another account (a worker's hand-over, under auth) comes
// with the server's response subject (_R_., which no client may name itself:
// the server refuses it as a reply): the answer goes back to the requester's
// own account, where it reaches only what that account imports, the subjects
// its own grants already allow (auth: accounts).
func Answerable(reply string) bool {
	return strings.HasPrefix(reply, inboxRoot) || strings.HasPrefix(reply, serviceReplyRoot)
}

// serviceReplyRoot prefixes the reply subject nats-server gives a request
// that crossed into another account through a service import.
const serviceReplyRoot = "_R_."

// inboxRoot is nats.go's default inbox prefix with its dot.
const inboxRoot = "_INBOX."
