-- Record a failed attempt of a job still held under its claim token: back to pending at
-- $4 (keeping its key's slot, so the conversation's order holds), or dead when attempts are
-- spent or $5 says the error is permanent.
-- The state is compared with a column (`c.held`), not a literal: planned on empty tables, the
-- literal sent the lookup through a full scan of jobs_running_lock_idx (every running job)
-- instead of the primary key (see job_finish_and_chain.sql).
-- $1 id, $2 claim token, $3 error, $4 retry at, $5 permanent
WITH c AS MATERIALIZED (SELECT 'running'::text AS held)
UPDATE jobs j
SET state = CASE WHEN $5 OR j.attempts >= j.max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = CASE WHEN $5 OR j.attempts >= j.max_attempts THEN j.run_at ELSE $4 END,
    finished_at = CASE WHEN $5 OR j.attempts >= j.max_attempts THEN now() ELSE NULL END,
    last_error = $3, processor_id = NULL, locked_until = NULL
FROM c
WHERE j.id = $1 AND j.claim_token = $2 AND j.state = c.held
RETURNING j.id, j.state, j.queue, j.concurrency_key
