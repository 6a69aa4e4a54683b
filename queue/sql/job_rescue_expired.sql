-- Return running jobs whose lock expired (their worker died or hung) to pending, or to dead when
-- out of attempts. Touches only expired locks; SKIP LOCKED lets every worker's rescuer run at
-- once without two rescuing the same job. Clearing claim_token makes the old worker's late
-- heartbeat or completion match nothing.
-- $1 limit, $2 retry at
WITH expired AS (
    SELECT id FROM jobs
    WHERE state = 'running' AND locked_until < now()
    ORDER BY locked_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = $2,
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() ELSE NULL END,
    last_error = 'lock expired: processor ' || coalesce(j.processor_id, '?') || ' stopped heartbeating',
    processor_id = NULL, claim_token = NULL, locked_until = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.state, j.queue, j.concurrency_key
