-- Bulk insert of jobs without a concurrency key (benchmarks, fan-out).
-- $1 queue, $2 kind, $3 payloads jsonb[], $4 max_attempts
INSERT INTO jobs (queue, kind, payload, state, max_attempts)
SELECT $1, $2, p, 'pending', $4 FROM unnest($3::jsonb[]) AS p
RETURNING id
