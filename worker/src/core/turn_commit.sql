-- A turn's whole commit in one statement, one round trip: lock the conversation, complete the
-- job if the claim is still ours, and only then advance what was answered and, if the agent is
-- on, the lane and session clock, record the turn and queue its replies (waking the account's
-- sender at commit), and promote the job queued behind this one (waking the pool's workers).
-- A handoff runs it inside a transaction and adds its own statements.
--
-- Returns whether the job was completed (false: the claim was lost, and nothing was written),
-- whether the agent is on, read under the row lock (a human who turned it off meanwhile wins:
-- nothing is recorded or sent, and the job completes as `agent_disabled`), and how many replies
-- were queued.
--
-- The conversation row is locked first, as ingest locks it before the job (the same order, so
-- the two cannot deadlock). This statement's snapshot is older than that lock and than the job
-- row's, so a job queued behind this one by an enqueue that committed while we waited would be
-- invisible to a promotion written here: queue_promote_next_after (migration 0006) takes a
-- fresh snapshot, after the completion holds the job row that every enqueue of the key touches
-- first. The job row is compared with `c.held` rather than a literal (see
-- job_finish_and_chain.sql), and the outbox insert is outbound_enqueue.sql's for this one
-- conversation: change them together. Replies are inserted in reply order, so ids (the send
-- order) follow it.
--
-- $1 conversation, $2 answered through, $3 new session start, $4 lane, $5 job, $6 provider,
-- $7 turn outcome, $8 steps, $9 prompt tokens, $10 completion tokens, $11 latency ms,
-- $12 recipient, $13 replies jsonb[], $14 reply max attempts (null: the account's
-- spec.delivery.maxAttempts), $15 sender notify channel,
-- $16 claim token, $17 jobs notify channel
WITH locked AS MATERIALIZED (
    SELECT c.id, c.agent_enabled FROM conversations c WHERE c.id = $1 FOR UPDATE
), input AS MATERIALIZED (
    SELECT $5::bigint AS id, $16::bigint AS token, 'running'::text AS held
), done AS (
    UPDATE jobs j
    SET state = 'completed',
        outcome = CASE WHEN l.agent_enabled THEN 'answered' ELSE 'agent_disabled' END,
        finished_at = now(), locked_until = NULL, last_error = NULL
    FROM input c, locked l
    WHERE j.id = c.id AND j.claim_token = c.token AND j.state = c.held
    RETURNING j.id, j.queue, j.concurrency_key
), conversation AS (
    UPDATE conversations SET
        answered_through = greatest(answered_through, $2),
        lane = CASE WHEN NOT agent_enabled THEN lane
                    WHEN $3::timestamptz IS NOT NULL THEN $4
                    ELSE coalesce($4, lane) END,
        session_started_at = CASE WHEN agent_enabled THEN coalesce($3, session_started_at)
                                  ELSE session_started_at END,
        last_activity_at = CASE WHEN agent_enabled THEN now() ELSE last_activity_at END
    WHERE id = $1 AND EXISTS (SELECT 1 FROM done)
    RETURNING account_id, agent_enabled
), turn AS (
    INSERT INTO agent_turns (job_id, conversation_id, provider, outcome, steps, prompt_tokens, completion_tokens, latency_ms)
    SELECT $5, $1, $6, $7, $8, $9, $10, $11 FROM conversation WHERE agent_enabled
), replies AS (
    INSERT INTO outbound_messages (account_id, conversation_id, job_id, recipient, message, sent_by_agent, max_attempts)
    SELECT c.account_id, $1, $5, $12, r.message, true,
           coalesce($14::int, (SELECT a.outbound_max_attempts FROM accounts a WHERE a.id = c.account_id), 8)
    FROM conversation c, unnest($13::jsonb[]) WITH ORDINALITY AS r(message, n)
    WHERE c.agent_enabled
    ORDER BY r.n
    RETURNING account_id
), notified AS (
    SELECT count(pg_notify($15, account_id)) AS n FROM (SELECT DISTINCT account_id FROM replies) a
), promoted AS MATERIALIZED (
    SELECT queue_promote_next_after(d.queue, d.concurrency_key, d.id, $17) AS id FROM done d
)
-- `promoted` must be read here: a SELECT CTE nobody reads never runs, and nothing would be promoted.
SELECT (SELECT count(*) FROM done) > 0 AS completed,
       coalesce((SELECT agent_enabled FROM conversation), false) AS agent_enabled,
       (SELECT count(*) FROM replies) AS replies,
       (SELECT count(id) FROM promoted) AS promoted
FROM notified
