-- A turn's writes to its conversation, in one statement and the first of the turn's transaction:
-- advance what was answered and, if the agent is on, the lane and session clock, record the turn,
-- and queue its replies (waking the account's sender at commit). Returns whether the agent is on,
-- read under the row lock the update takes (a human who turned it off meanwhile wins, and
-- nothing is recorded or sent), and how many replies were queued.
--
-- The conversation lock comes first (ingest locks the conversation before its job, so the turn
-- does too), and holding it from this statement on is what lets the job's completion, the next
-- statement, see every job queued behind it (jobs::complete_if_claimed_under_key_lock).
--
-- The outbox insert is outbound_enqueue.sql's, for this one conversation: change them together.
-- Rows are inserted in reply order, so ids (the send order) follow it.
--
-- $1 conversation, $2 answered through, $3 new session start, $4 lane, $5 job, $6 provider,
-- $7 outcome, $8 steps, $9 prompt tokens, $10 completion tokens, $11 latency ms,
-- $12 recipient, $13 replies jsonb[], $14 reply max attempts, $15 sender notify channel
WITH conversation AS (
    UPDATE conversations SET
        answered_through = greatest(answered_through, $2),
        lane = CASE WHEN NOT agent_enabled THEN lane
                    WHEN $3::timestamptz IS NOT NULL THEN $4
                    ELSE coalesce($4, lane) END,
        session_started_at = CASE WHEN agent_enabled THEN coalesce($3, session_started_at)
                                  ELSE session_started_at END,
        last_activity_at = CASE WHEN agent_enabled THEN now() ELSE last_activity_at END
    WHERE id = $1
    RETURNING account_id, agent_enabled
), turn AS (
    INSERT INTO agent_turns (job_id, conversation_id, provider, outcome, steps, prompt_tokens, completion_tokens, latency_ms)
    SELECT $5, $1, $6, $7, $8, $9, $10, $11 FROM conversation WHERE agent_enabled
), replies AS (
    INSERT INTO outbound_messages (account_id, conversation_id, job_id, recipient, message, sent_by_agent, max_attempts)
    SELECT c.account_id, $1, $5, $12, r.message, true, $14
    FROM conversation c, unnest($13::jsonb[]) WITH ORDINALITY AS r(message, n)
    WHERE c.agent_enabled
    ORDER BY r.n
    RETURNING account_id
), notified AS (
    SELECT count(pg_notify($15, account_id)) AS n FROM (SELECT DISTINCT account_id FROM replies) a
)
SELECT c.agent_enabled, (SELECT count(*) FROM replies) AS replies FROM conversation c, notified
