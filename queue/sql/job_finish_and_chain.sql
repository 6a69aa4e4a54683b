-- Finish jobs still held under their claim tokens and, in the same statement, hand each freed
-- key's next waiting job on: straight to `running` for this processor (chained: no pending
-- write, no claim) or to `pending` for anyone. One row per finished job, with its successor's
-- columns when one was promoted here.
--
-- Finishing keeps the row as `completed` ($4) or deletes it. The successor search sees only
-- waiting jobs committed before this statement began; a job enqueued while we waited for the
-- finished row's lock (job_insert_active.sql) is found by the caller's follow-up
-- job_promote_next_chained.sql for every key that got no successor here. No `NOT EXISTS` probe
-- is needed: the finished job was its key's only active job (jobs_one_active_per_key_idx).
-- A key's waiting jobs all have larger ids than its active job (they are inserted behind it,
-- one at a time under its row lock), so `w.id > d.id` starts the index scan past the entries
-- of the key's earlier, already finished jobs.
--
-- Row lookups compare state with a column (`c.held`, `s.seen_state`) rather than a literal:
-- a literal lets the planner, misled by statistics taken when no job was running or waiting,
-- pick a partial index (jobs_running_lock_idx, jobs_waiting_idx) and rescan it for every input
-- row instead of probing the primary key. It did: 250 ms per batch instead of 10.
--
-- Chaining is fair across conversations: a successor is chained only if no runnable job of the
-- queue has been pending longer; otherwise it becomes pending and is claimed in FIFO order.
--
-- The shared blocks are the part_*.sql files (queue/src/sql.rs).
--
-- $1 ids bigint[], $2 claim tokens bigint[], $3 outcomes text[], $4 retain bool,
-- $5 most successors to chain, $6 processor_id, $7 lock seconds
WITH input AS MATERIALIZED (
    SELECT c.*, 'running'::text AS held
    FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS c(id, token, outcome)
), completed AS (
    UPDATE jobs j
    SET state = 'completed', outcome = c.outcome, finished_at = now(),
        locked_until = NULL, last_error = NULL
    FROM input c
    WHERE $4 AND j.id = c.id AND j.claim_token = c.token AND j.state = c.held
    RETURNING j.id, j.queue, j.concurrency_key
), deleted AS (
    DELETE FROM jobs j
    USING input c
    WHERE NOT $4 AND j.id = c.id AND j.claim_token = c.token AND j.state = c.held
    RETURNING j.id, j.queue, j.concurrency_key
), done AS (
    SELECT * FROM completed UNION ALL SELECT * FROM deleted
), oldest_pending AS MATERIALIZED (
    {oldest_pending}
), successor AS (
    SELECT d.id AS after_id, head.id, head.state AS seen_state,
           row_number() OVER (ORDER BY d.id) <= $5
             AND head.run_at <= now()
             AND head.run_at <= coalesce(o.run_at, 'infinity') AS chain
    FROM done d
    JOIN oldest_pending o USING (queue)
    CROSS JOIN LATERAL (
        {next_waiting}
    ) head
), promoted AS (
    UPDATE jobs j
    SET {take_running}
    FROM successor s
    WHERE j.id = s.id AND j.state = s.seen_state
    RETURNING s.after_id, j.id, j.queue, j.kind, j.concurrency_key, j.payload, j.attempts,
              j.max_attempts, j.claim_token, j.created_at, j.run_at, j.state
)
SELECT d.id AS finished_id, d.queue AS finished_queue, d.concurrency_key AS finished_key,
       p.id, p.kind, p.payload, p.attempts, p.max_attempts, p.claim_token, p.created_at,
       p.run_at, p.state
FROM done d
LEFT JOIN promoted p ON p.after_id = d.id
