-- Depth per queue in one pass over unfinished jobs (jobs_unfinished_idx): what the operator
-- scales AgentPools from.
SELECT queue,
       count(*) FILTER (WHERE state IN ('pending', 'waiting'))            AS pending,
       count(*) FILTER (WHERE state = 'running')                          AS running,
       count(*) FILTER (WHERE state = 'dead')                             AS dead,
       coalesce(extract(epoch FROM now() - min(run_at) FILTER (
           WHERE state IN ('pending', 'waiting') AND run_at <= now())), 0)::float8 AS oldest_pending_seconds
FROM jobs
WHERE state <> 'completed'
GROUP BY queue
