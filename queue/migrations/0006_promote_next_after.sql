-- Promotion for a job completed in one statement (one round trip): job_finish_one.sql, and an
-- agent turn's turn_commit.sql, which also locks its conversation and records the turn. Every enqueue
-- of a key touches the key's active job row before it queues a job behind it, so the
-- completion's UPDATE waits for such an enqueue to commit; but the statement's snapshot is older
-- than that wait, so a successor probe or promotion written into the statement would miss the
-- queued job and strand it. Queries of a VOLATILE function each take a fresh snapshot (READ
-- COMMITTED), so this function, called once the completion holds the row, sees every job queued
-- behind, as job_promote_next.sql does from a later statement. PL/pgSQL keeps its plan for the
-- session.
--
-- Promotes the oldest waiting job of (p_queue, p_key) after job p_after, which the caller has
-- just completed in the same transaction; notifies p_channel with the queue at commit when it
-- did. Returns the promoted job's id, or null.
CREATE FUNCTION queue_promote_next_after(p_queue text, p_key text, p_after bigint, p_channel text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    promoted bigint;
BEGIN
    -- head.state (always 'waiting') rather than a literal: see job_finish_and_chain.sql.
    UPDATE jobs j
    SET state = 'pending'
    FROM (
        SELECT w.id, w.state FROM jobs w
        WHERE w.queue = p_queue AND w.concurrency_key = p_key AND w.state = 'waiting'
          AND w.id > p_after
        ORDER BY w.id
        LIMIT 1
    ) head
    WHERE j.id = head.id AND j.state = head.state
    RETURNING j.id INTO promoted;
    IF promoted IS NOT NULL THEN
        PERFORM pg_notify(p_channel, p_queue);
    END IF;
    RETURN promoted;
END
$$;
