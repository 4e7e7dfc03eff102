"""S3 (and S3-compatible) storage: concurrent multipart uploads, ranged reads, one retry policy.

`S3Storage` serves ``s3://`` / ``s3a://`` URLs. Everything still goes through s3fs — its client,
credentials chain, endpoint and session handling — but

* a shard is written by `S3Sink` as a multipart upload whose parts are the engine's
  staged chunks, uploaded as they arrive and concurrently; the upload is completed only after every part is
  confirmed, and aborted when the save fails. A shard of one chunk is a single PUT.
* a chunk is loaded by `S3Reader` with one ranged GET, read straight into its destination and hashed as it arrives.
* every request runs under one `RetryPolicy` (`.retry`): transient failures are retried
  with capped exponential backoff and full jitter; permanent ones fail at once with an `S3Error`
  that names the bucket, key and S3 error code.
"""

from .storage import S3Storage

__all__ = ["S3Storage"]
