-- Make the oldest waiting job of each given key pending: one probe of jobs_waiting_idx per key.
-- Run as its own statement after the key's active job left pending/running, so its snapshot
-- includes waiting rows that committed while we waited for the active row's lock.
-- $1 queues text[], $2 keys text[]
UPDATE jobs j
SET state = 'pending'
FROM (
    SELECT DISTINCT queue, key FROM unnest($1::text[], $2::text[]) AS k(queue, key)
) k
CROSS JOIN LATERAL (
    {next_waiting}
) head
-- head.state (always 'waiting') rather than a literal: see job_finish_and_chain.sql.
WHERE j.id = head.id AND j.state = head.state
  AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.queue = j.queue AND a.concurrency_key = j.concurrency_key
                  AND a.state IN ('pending', 'running'))
RETURNING j.id
