-- Apply delivery status webhooks, one or a batch (the gateway's group commit), in one
-- statement. Each input is matched by our id (biz_opaque_callback_data) or the provider message
-- id. States only move forward (queued < sending < sent < delivered < read < failed), so
-- out-of-order or duplicate webhooks are harmless; the furthest state of each row wins. Rows are
-- locked in id order, so two gateways batching the same rows cannot deadlock. Returns the input
-- positions that moved their row forward from where it stood before the statement.
-- $1 our ids (null = unknown), $2 provider message ids, $3 states, $4 error codes, $5 errors
WITH input AS (
    SELECT *
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::text[])
         WITH ORDINALITY AS t(our_id, provider_id, state, error_code, error, ord)
), resolved AS MATERIALIZED (
    SELECT i.*, coalesce(
        i.our_id,
        (SELECT p.id FROM outbound_messages p WHERE p.provider_message_id = i.provider_id)) AS target
    FROM input i
), locked AS (
    -- By primary key (`= ANY`), never a join the planner could turn into a scan of the table.
    SELECT o.id, o.state FROM outbound_messages o
    WHERE o.id = ANY (ARRAY(SELECT target FROM resolved))
    ORDER BY o.id
    FOR UPDATE
), matched AS (
    SELECT r.ord, r.provider_id, r.state, r.error_code, r.error, l.id, l.state AS old_state
    FROM resolved r JOIN locked l ON l.id = r.target
), ranked AS (
    SELECT m.*,
           array_position(ARRAY['queued', 'sending', 'sent', 'delivered', 'read', 'failed'], m.state) AS new_rank,
           array_position(ARRAY['queued', 'sending', 'sent', 'delivered', 'read', 'failed'], m.old_state) AS old_rank
    FROM matched m
), winner AS (
    SELECT DISTINCT ON (id) * FROM ranked ORDER BY id, new_rank DESC, ord DESC
), applied AS (
    UPDATE outbound_messages o
    SET state = w.state,
        provider_message_id = coalesce(o.provider_message_id, w.provider_id),
        sent_at = coalesce(o.sent_at, now()),
        status_at = now(),
        error_code = coalesce(w.error_code, o.error_code),
        last_error = coalesce(w.error, o.last_error)
    FROM winner w
    WHERE o.id = w.id AND w.new_rank > w.old_rank
    RETURNING o.id
)
SELECT ord FROM ranked WHERE new_rank > old_rank
