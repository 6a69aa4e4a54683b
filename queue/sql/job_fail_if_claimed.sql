-- Record a failed attempt of a job still held under its claim token: back to pending at
-- $4 (keeping its key's slot, so the conversation's order holds), or dead when attempts are
-- spent or $5 says the error is permanent.
-- $1 id, $2 claim token, $3 error, $4 retry at, $5 permanent
UPDATE jobs
SET state = CASE WHEN $5 OR attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = CASE WHEN $5 OR attempts >= max_attempts THEN run_at ELSE $4 END,
    finished_at = CASE WHEN $5 OR attempts >= max_attempts THEN now() ELSE NULL END,
    last_error = $3, processor_id = NULL, locked_until = NULL
WHERE id = $1 AND claim_token = $2 AND state = 'running'
RETURNING id, state, queue, concurrency_key
