-- Bulk enqueue, step 2: every other job, `waiting` behind its key's active job, in input order
-- (ids ascend with it: waiting jobs are promoted in id order). Runs after step 1 in the same
-- transaction, so each key's head has the smaller id.
-- $1 queue, $2 kind, $3 keys text[], $4 payloads jsonb[], $5 max_attempts
INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts)
SELECT $1, $2, k, p, 'waiting', $5
FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS t(k, p, ord)
ORDER BY ord
RETURNING id
