// Package bus is the Go client SDK of mlx-serving: what a backend service
// needs to put generation jobs on the fleet and read them back.
//
//   - Connect opens a NATS connection (retrying until the bus is up);
//   - NewClient builds a Client: Submit queues a job, Cancel cancels one,
//     Result reads its durable terminal record;
//   - SubmitStream (or OpenStream, then Submit) and Watch follow a job's token
//     events: a JobStream yields Events and always ends in exactly one terminal
//     event, across retries and migrations. It keeps the text (and logprob
//     entries) its caller was given (Text, Logprobs) and hands every event over
//     as a change to it: a caller that takes back each event's Drop (almost
//     always zero) and appends each Token.Delta and the terminal's Rest holds
//     exactly Result.Text. A retry that resumes repeats nothing; one that starts
//     over and regenerates what the caller has yields empty deltas; only where
//     the texts really differ does a Drop say how many bytes (characters) and
//     entries to take back;
//   - the Err* sentinels say why a call was refused (errors.Is).
//
// The plumbing the servers share — subject names, provisioning, the embedded
// server, the RESULTS writer — lives under internal/ and is not part of the SDK.
package bus
