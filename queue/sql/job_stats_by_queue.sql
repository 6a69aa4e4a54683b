-- Depth per queue. Each count reads only its state's partial index (no index serves stats
-- alone: each would cost an insert on every job state change). What the operator scales from.
WITH pending AS (
    SELECT queue, count(*) AS n, min(run_at) FILTER (WHERE run_at <= now()) AS oldest
    FROM jobs WHERE state = 'pending' GROUP BY queue
), waiting AS (
    SELECT queue, count(*) AS n FROM jobs WHERE state = 'waiting' GROUP BY queue
), running AS (
    SELECT queue, count(*) AS n FROM jobs WHERE state = 'running' GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS n FROM jobs WHERE state = 'dead' GROUP BY queue
), queues AS (
    SELECT queue FROM pending UNION SELECT queue FROM waiting UNION SELECT queue FROM running UNION SELECT queue FROM dead
)
SELECT q.queue,
       (coalesce(p.n, 0) + coalesce(w.n, 0))::bigint AS pending,
       coalesce(r.n, 0)::bigint AS running,
       coalesce(d.n, 0)::bigint AS dead,
       -- A waiting job waits at least as long as its key's pending head, so the pending jobs'
       -- oldest run_at is the oldest of both.
       coalesce(extract(epoch FROM now() - p.oldest), 0)::float8 AS oldest_pending_seconds
FROM queues q
LEFT JOIN pending p USING (queue)
LEFT JOIN waiting w USING (queue)
LEFT JOIN running r USING (queue)
LEFT JOIN dead d USING (queue)
