-- Like job_promote_next.sql, but a completing worker with free slots takes the next job of up
-- to as many keys straight to `running` under its own processor id and a fresh claim token
-- (keys flagged in $3), saving the pending write and a separate claim. Other keys' next jobs
-- become pending as usual. Runs as its own statement after the completion, for the same
-- snapshot reason as job_promote_next.sql. Chaining is FIFO-fair as in job_finish_and_chain.sql:
-- not while an older runnable job of the queue is pending.
-- $1 queues text[], $2 keys text[], $3 chain bool[], $4 processor_id, $5 lock seconds
WITH k AS (
    SELECT DISTINCT ON (queue, key) queue, key, chain
    FROM unnest($1::text[], $2::text[], $3::bool[]) AS t(queue, key, chain)
    ORDER BY queue, key, chain DESC
), oldest_pending AS MATERIALIZED (
    {oldest_pending}
), head AS (
    SELECT w.id, w.state AS seen_state,
           k.chain AND w.run_at <= now() AND w.run_at <= coalesce(o.run_at, 'infinity') AS chain
    FROM k
    JOIN oldest_pending o USING (queue)
    CROSS JOIN LATERAL (
        {next_waiting}
    ) w
)
UPDATE jobs j
SET {take_running}
FROM head
-- seen_state (always 'waiting') rather than a literal: see job_finish_and_chain.sql.
WHERE j.id = head.id AND j.state = head.seen_state
  AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.queue = j.queue AND a.concurrency_key = j.concurrency_key
                  AND a.state IN ('pending', 'running'))
RETURNING j.id, j.queue, j.kind, j.concurrency_key, j.payload, j.attempts, j.max_attempts,
          j.claim_token, j.created_at, j.run_at, j.state
