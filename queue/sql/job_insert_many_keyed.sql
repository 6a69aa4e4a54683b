-- Bulk insert of keyed jobs, for callers that own the keys (a bulk load with no other writer of
-- these keys). Per key, in input order, the first job is pending when the key has no active job
-- and every other one waits. The unique index still rejects any second active job.
-- $1 queue, $2 kind, $3 keys text[], $4 payloads jsonb[], $5 max_attempts
WITH input AS (
    SELECT k, p, ord FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS t(k, p, ord)
), ranked AS (
    SELECT k, p, ord,
           row_number() OVER (PARTITION BY k ORDER BY ord) AS n,
           EXISTS (SELECT 1 FROM jobs a WHERE a.queue = $1 AND a.concurrency_key = k
                   AND a.state IN ('pending', 'running', 'waiting')) AS busy
    FROM input
)
INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts)
SELECT $1, $2, k, p, CASE WHEN n = 1 AND NOT busy THEN 'pending' ELSE 'waiting' END, $5
FROM ranked ORDER BY ord
RETURNING id
