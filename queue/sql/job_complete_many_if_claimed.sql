-- Complete jobs still held under the given claim tokens. A stale worker's token matches nothing.
-- Returns the completed jobs' keys so the caller can promote the next waiting job of each key
-- (job_promote_next.sql), in a later statement of the same transaction.
-- $1 ids bigint[], $2 claim tokens bigint[], $3 outcomes text[]
UPDATE jobs j
SET state = 'completed', outcome = c.outcome, finished_at = now(),
    locked_until = NULL, last_error = NULL
FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS c(id, token, outcome)
WHERE j.id = c.id AND j.claim_token = c.token AND j.state = 'running'
RETURNING j.id, j.queue, j.concurrency_key
