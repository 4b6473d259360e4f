package schemas

// ReservedMetadataPrefix starts the job metadata keys only operator tools may
// set: the dispatcher reads them as instructions (MetadataAttemptBase), so a
// client that could set them could steer how its job is numbered. The gateway
// refuses them in a client's metadata.
const ReservedMetadataPrefix = "mlx_"

// MetadataAttemptBase is the job metadata key replay sets to the attempts a
// job used before it was dead-lettered: the dispatcher numbers the new
// attempts after them (clamped so that every attempt stays within MaxAttempt).
const MetadataAttemptBase = ReservedMetadataPrefix + "attempt_base"
