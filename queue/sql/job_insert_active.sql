-- Insert a job as `pending`, unless its key already has a pending or running job. In that case
-- the existing active row is touched (a no-op update) and returned with inserted = false: the
-- touch locks that row until the caller commits, so the job's completion (which updates the same
-- row) waits for us and its promotion step, a later statement, sees the `waiting` row we add next.
-- $1 queue, $2 kind, $3 concurrency_key, $4 payload, $5 max_attempts, $6 run_at
INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts, run_at)
VALUES ($1, $2, $3, $4, 'pending', $5, $6)
ON CONFLICT (queue, concurrency_key) WHERE state IN ('pending', 'running') AND concurrency_key IS NOT NULL
DO UPDATE SET concurrency_key = EXCLUDED.concurrency_key
RETURNING id, (xmax = 0) AS inserted
