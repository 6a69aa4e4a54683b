-- Everything a turn reads, in one round trip: the conversation, the messages no turn answered
-- yet, whether the session expired, and the session's history. One row.
--
-- The session clock is the last message either way up to what was answered; a session idle
-- longer than the TTL when the first unanswered message arrived starts over at that message
-- (`new_session_start`, null while the session lives), and history is taken from the session's
-- start: inbound messages already answered and replies, the newest $3, oldest first.
--
-- $1 conversation, $2 session TTL seconds, $3 history messages
WITH c AS MATERIALIZED (
    SELECT c.id, c.account_id, c.lane, c.agent_enabled, c.session_started_at, c.answered_through,
           ct.contact_key, ct.wa_id, ct.display_name, a.handoff_message,
           (SELECT count(*) FROM agent_turns t WHERE t.conversation_id = c.id) AS turn_index,
           (SELECT max(at) FROM (
                SELECT max(i.received_at) AS at FROM inbound_messages i
                WHERE i.conversation_id = c.id AND i.id <= c.answered_through
                UNION ALL
                SELECT max(o.created_at) FROM outbound_messages o WHERE o.conversation_id = c.id
            ) s) AS previous_activity
    FROM conversations c JOIN contacts ct ON ct.id = c.contact_id JOIN accounts a ON a.id = c.account_id
    WHERE c.id = $1
), unanswered AS MATERIALIZED (
    SELECT i.id, i.body, i.received_at FROM c
    JOIN inbound_messages i ON i.conversation_id = c.id AND i.id > c.answered_through AND i.runs_agent
), session AS MATERIALIZED (
    SELECT CASE WHEN c.previous_activity IS NOT NULL
                 AND f.received_at - c.previous_activity > make_interval(secs => $2)
                THEN f.received_at END AS new_start,
           c.session_started_at
    FROM c LEFT JOIN LATERAL (SELECT received_at FROM unanswered ORDER BY id LIMIT 1) f ON true
), history AS MATERIALIZED (
    SELECT h.* FROM c, session s, LATERAL (
        SELECT 'user' AS role, i.body AS text, i.received_at AS at, i.id FROM inbound_messages i
        WHERE i.conversation_id = c.id AND i.id <= c.answered_through
          AND i.received_at >= coalesce(s.new_start, s.session_started_at) AND i.body IS NOT NULL
        UNION ALL
        -- A reply with buttons reads as WhatsApp Web shows it: the text, then `1. <title>` lines
        -- (the rules agent maps a typed number back to its button).
        SELECT 'assistant',
               CASE WHEN o.message->>'type' = 'interactive' THEN
                   (o.message->'interactive'->'body'->>'text') || E'\n\n' || (
                       SELECT string_agg(b.n || '. ' || coalesce(b.button->'reply'->>'title', b.button->>'title'),
                                         E'\n' ORDER BY b.n)
                       FROM jsonb_array_elements(coalesce(o.message->'interactive'->'action'->'buttons',
                                                          o.message->'interactive'->'action'->'sections'->0->'rows'))
                            WITH ORDINALITY AS b(button, n))
               ELSE o.message->'text'->>'body' END,
               o.created_at, o.id FROM outbound_messages o
        WHERE o.conversation_id = c.id AND o.created_at >= coalesce(s.new_start, s.session_started_at)
          AND o.message->>'type' IN ('text', 'interactive')
        ORDER BY at DESC, id DESC LIMIT $3
    ) h
)
SELECT c.account_id, c.lane, c.agent_enabled, c.contact_key, c.wa_id,
       c.display_name, c.handoff_message, c.turn_index, s.new_start AS new_session_start,
       ARRAY(SELECT id FROM unanswered ORDER BY id) AS unanswered_ids,
       ARRAY(SELECT body FROM unanswered ORDER BY id) AS unanswered_bodies,
       ARRAY(SELECT role FROM history ORDER BY at, id, role) AS history_roles,
       ARRAY(SELECT text FROM history ORDER BY at, id, role) AS history_texts
FROM c, session s
