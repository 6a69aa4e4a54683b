-- Extend the locks of jobs still held under the given claim tokens; returns the ids still held.
-- A job missing from the result was rescued or completed elsewhere: its worker must give it up.
-- $1 ids bigint[], $2 claim tokens bigint[], $3 lock seconds
UPDATE jobs j
SET heartbeat_at = now(), locked_until = now() + make_interval(secs => $3)
FROM (SELECT c.*, 'running'::text AS held FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
      OFFSET 0) c
-- c.held rather than a literal keeps the lookup on the primary key (see job_finish_and_chain.sql).
WHERE j.id = c.id AND j.claim_token = c.token AND j.state = c.held
RETURNING j.id
