package bus

import "github.com/mlx-serving/mlx-serving/internal/subjects"

// ReplySubject is the default reply subject of a job of tenant ("" is the
// default tenant): mlx.reply.<tenant>.<job-id>, where its token events and its
// terminal event arrive. A custom reply_to must lie under the same tenant's
// mlx.reply.<tenant>. namespace.
func ReplySubject(tenant, jobID string) string { return subjects.Reply(tenant, jobID) }
