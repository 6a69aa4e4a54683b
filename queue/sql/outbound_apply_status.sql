-- Apply a delivery status webhook. Matched by our id (biz_opaque_callback_data) or the provider
-- message id. States only move forward (queued < sending < sent < delivered < read < failed), so
-- out-of-order or duplicate webhooks are harmless.
-- $1 our id or null, $2 provider message id, $3 new state, $4 error code, $5 error
UPDATE outbound_messages o
SET state = $3,
    provider_message_id = coalesce(o.provider_message_id, $2),
    sent_at = coalesce(o.sent_at, now()),
    status_at = now(),
    error_code = coalesce($4, o.error_code),
    last_error = coalesce($5, o.last_error)
WHERE (o.id = $1 OR ($1 IS NULL AND o.provider_message_id = $2))
  AND array_position(ARRAY['queued', 'sending', 'sent', 'delivered', 'read', 'failed'], $3)
    > array_position(ARRAY['queued', 'sending', 'sent', 'delivered', 'read', 'failed'], o.state)
RETURNING o.id
