-- Safety net: promote the head of any key that has waiting jobs but no active one (for example
-- after a job row was deleted by hand). Normal completion never leaves such keys.
-- $1 limit
UPDATE jobs j
SET state = 'pending'
FROM (
    SELECT DISTINCT ON (w.queue, w.concurrency_key) w.id, w.state
    FROM jobs w
    WHERE w.state = 'waiting'
      AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.queue = w.queue AND a.concurrency_key = w.concurrency_key
                      AND a.state IN ('pending', 'running'))
    ORDER BY w.queue, w.concurrency_key, w.id
    LIMIT $1
) head
-- head.state (always 'waiting') rather than a literal: see job_finish_and_chain.sql.
WHERE j.id = head.id AND j.state = head.state
RETURNING j.id
