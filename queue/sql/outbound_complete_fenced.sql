-- Record that WhatsApp accepted messages (one, or a sender's batch), only under the claim's epoch
-- while it is still the account's fence. A status webhook may have moved a row forward already (it
-- carries our id in biz_opaque_callback_data): the state never moves back. Rows are locked in id
-- order, as the status batches lock them, so the two cannot deadlock. Returns the ids recorded.
-- $1 ids bigint[], $2 epoch, $3 provider message ids text[]
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $3::text[]) AS t(id, provider_id)
), locked AS (
    SELECT o.id, i.provider_id
    FROM input i
    JOIN outbound_messages o ON o.id = i.id
    JOIN accounts a ON a.id = o.account_id
    WHERE o.claim_epoch = $2 AND o.state IN ('sending', 'sent', 'delivered', 'read')
      AND a.fence_epoch = $2
    ORDER BY o.id
    FOR UPDATE OF o
)
UPDATE outbound_messages o
SET state = CASE WHEN o.state = 'sending' THEN 'sent' ELSE o.state END,
    provider_message_id = coalesce(o.provider_message_id, l.provider_id),
    sent_at = coalesce(o.sent_at, now())
FROM locked l
WHERE o.id = l.id
RETURNING o.id
