-- Record that WhatsApp accepted the message, only under the claim's epoch while it is still the
-- account's fence. A status webhook may have moved the row forward already (it carries our id in
-- biz_opaque_callback_data): the state never moves back.
-- $1 id, $2 epoch, $3 provider message id
UPDATE outbound_messages o
SET state = CASE WHEN o.state = 'sending' THEN 'sent' ELSE o.state END,
    provider_message_id = coalesce(o.provider_message_id, $3),
    sent_at = coalesce(o.sent_at, now())
FROM accounts a
WHERE o.id = $1 AND o.claim_epoch = $2 AND o.state IN ('sending', 'sent', 'delivered', 'read')
  AND a.id = o.account_id AND a.fence_epoch = $2
RETURNING o.id
