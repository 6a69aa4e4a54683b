-- Claim up to $3 queued outbound messages of account $1, only while the account's fence equals
-- $2 (FOR SHARE keeps a concurrent fence bump waiting until this claim commits). Per
-- conversation only the oldest unsent message is eligible, so replies leave in order.
-- $1 account, $2 epoch, $3 limit, $4 claimed_by
WITH fence AS (
    SELECT id FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE
), picked AS (
    SELECT o.id FROM outbound_messages o, fence
    WHERE o.account_id = fence.id AND o.state = 'queued' AND o.run_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM outbound_messages p
          WHERE p.conversation_id = o.conversation_id AND p.id < o.id AND p.state IN ('queued', 'sending'))
    ORDER BY o.id
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbound_messages o
SET state = 'sending', attempts = o.attempts + 1, claim_epoch = $2, claimed_by = $4, claimed_at = now()
FROM picked
WHERE o.id = picked.id
RETURNING o.id, o.account_id, o.conversation_id, o.recipient, o.message, o.attempts, o.max_attempts
