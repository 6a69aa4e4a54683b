-- Make the oldest waiting job of each given key pending. Run as its own statement after the
-- key's active job left pending/running, so its snapshot includes waiting rows that committed
-- while we waited for the active row's lock.
-- $1 queues text[], $2 keys text[]
UPDATE jobs j
SET state = 'pending'
FROM (
    SELECT DISTINCT ON (w.queue, w.concurrency_key) w.id
    FROM jobs w
    JOIN unnest($1::text[], $2::text[]) AS k(queue, key)
      ON w.queue = k.queue AND w.concurrency_key = k.key
    WHERE w.state = 'waiting'
    ORDER BY w.queue, w.concurrency_key, w.id
) head
WHERE j.id = head.id AND j.state = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.queue = j.queue AND a.concurrency_key = j.concurrency_key
                  AND a.state IN ('pending', 'running'))
RETURNING j.id
