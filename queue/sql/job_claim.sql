-- Claim up to $2 pending jobs of queue $1 whose run_at has come. SKIP LOCKED: concurrent
-- claimers never wait for or share a row. Only the head job of each key is ever pending
-- (jobs_one_active_per_key_idx), so no conversation blocks another.
-- Each claimed job gets a fresh claim_token: heartbeats and completions must present it.
-- The SET list is part_take_running.sql (chain always: every picked row is taken).
-- $1 queue, $2 limit, $3 processor_id, $4 lock seconds
WITH picked AS (
    SELECT id FROM jobs
    WHERE queue = $1 AND state = 'pending' AND run_at <= now()
    ORDER BY run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j
SET {take_running}
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.kind, j.concurrency_key, j.payload, j.attempts, j.max_attempts,
          j.claim_token, j.created_at, j.run_at
