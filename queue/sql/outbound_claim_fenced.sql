-- Claim up to $3 queued outbound messages of account $1, only while the account's fence equals
-- $2 (FOR SHARE keeps a concurrent fence bump waiting until this claim commits). Per
-- conversation only the oldest unsent message is eligible, so replies leave in order.
--
-- Both lookups are written so that a plan made on empty tables still probes by key: the
-- account is compared with $1 (joined through the fence, the plan scanned every account's
-- queued messages and sorted them), and the older-message check is kept a per-message probe of
-- outbound_in_flight_idx by `OFFSET 0` (pulled up into an anti join, it read every in-flight
-- message for every candidate: 38 ms and 13,000 buffers per claim once replies queued up).
-- $1 account, $2 epoch, $3 limit, $4 claimed_by
WITH fence AS (
    SELECT id FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE
), picked AS (
    SELECT o.id FROM outbound_messages o
    WHERE o.account_id = $1 AND o.state = 'queued' AND o.run_at <= now()
      AND EXISTS (SELECT 1 FROM fence)
      AND NOT EXISTS (
          SELECT 1 FROM outbound_messages p
          WHERE p.conversation_id = o.conversation_id AND p.id < o.id AND p.state IN ('queued', 'sending')
          OFFSET 0)
    ORDER BY o.id
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbound_messages o
SET state = 'sending', attempts = o.attempts + 1, claim_epoch = $2, claimed_by = $4, claimed_at = now()
FROM picked
WHERE o.id = picked.id
RETURNING o.id, o.account_id, o.conversation_id, o.recipient, o.message, o.attempts, o.max_attempts
