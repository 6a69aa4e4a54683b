-- Queue a job behind the active job of its key (see job_insert_active.sql for the lock that
-- makes this safe against a concurrent completion).
-- $1 queue, $2 kind, $3 concurrency_key, $4 payload, $5 max_attempts, $6 run_at
INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts, run_at)
VALUES ($1, $2, $3, $4, 'waiting', $5, $6)
RETURNING id
