// Package bus is the Go client SDK of mlx-serving: what a backend service
// needs to put generation jobs on the fleet and read them back.
//
//   - Connect opens a NATS connection (retrying until the bus is up);
//   - NewClient builds a Client: Submit queues a job, Cancel cancels one,
//     Result reads its durable terminal record;
//   - SubmitStream (or OpenStream, then Submit) and Watch follow a job's token
//     events: a JobStream yields Events and always ends in exactly one terminal
//     event, across retries and migrations;
//   - the Err* sentinels say why a call was refused (errors.Is).
//
// The plumbing the servers share — subject names, provisioning, the embedded
// server, the RESULTS writer — lives under internal/ and is not part of the SDK.
package bus
