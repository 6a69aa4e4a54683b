-- Finish one job still held under its claim token (kept as `completed`) and promote its key's
-- next waiting job, in one statement and one round trip, waking the queue's workers at commit
-- when one was promoted.
--
-- Every enqueue of the key touches the key's active row (this job) before it queues a job
-- behind it, so the completion's UPDATE waits for any such enqueue to commit; but this
-- statement's snapshot is older than that wait and would miss the queued job. The promotion is
-- therefore queue_promote_next_after (migration 0006), whose query takes a fresh snapshot after
-- the UPDATE holds the row. `c.held` rather than a literal: see job_finish_and_chain.sql.
--
-- $1 id, $2 claim token, $3 outcome, $4 notify channel
WITH input AS MATERIALIZED (
    SELECT $1::bigint AS id, $2::bigint AS token, 'running'::text AS held
), done AS (
    UPDATE jobs j
    SET state = 'completed', outcome = $3, finished_at = now(), locked_until = NULL, last_error = NULL
    FROM input c
    WHERE j.id = c.id AND j.claim_token = c.token AND j.state = c.held
    RETURNING j.id, j.queue, j.concurrency_key
), promoted AS MATERIALIZED (
    SELECT queue_promote_next_after(d.queue, d.concurrency_key, d.id, $4) AS id FROM done d
)
-- `promoted` must be read here: a SELECT CTE nobody reads never runs, and nothing would be promoted.
SELECT (SELECT count(*) FROM done) AS completed, (SELECT count(id) FROM promoted) AS promoted
