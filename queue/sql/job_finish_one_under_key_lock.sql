-- Finish one job still held under its claim token (kept as `completed`) and hand its key's next
-- waiting job on to `pending`, waking the queue's workers at commit when one was, for a caller
-- that holds its key's lock (jobs::complete_if_claimed_under_key_lock): this statement's
-- snapshot sees every waiting job of the key, so no follow-up promotion is needed.
--
-- The lean form of job_finish_and_chain.sql (one job, retained, nothing chained): Postgres
-- initialises every node of a plan on each execution, and the batch, delete, fairness and
-- chaining branches were most of that one's. Same lookups, same reasons: `c.held` and
-- `s.seen_state` rather than literals, `w.id > d.id` to skip the key's finished jobs.
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
), successor AS (
    SELECT head.id, head.state AS seen_state
    FROM done d
    CROSS JOIN LATERAL (
        SELECT w.id, w.state FROM jobs w
        WHERE w.queue = d.queue AND w.concurrency_key = d.concurrency_key
          AND w.state = 'waiting' AND w.id > d.id
        ORDER BY w.id
        LIMIT 1
    ) head
), promoted AS (
    UPDATE jobs j SET state = 'pending'
    FROM successor s
    WHERE j.id = s.id AND j.state = s.seen_state
    RETURNING j.queue
)
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(pg_notify($4, queue)) FROM promoted) AS promoted
