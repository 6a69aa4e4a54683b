-- Record a failed send under the claim's epoch: queued again at $5, or failed for good when
-- permanent or out of attempts. Ignored if a status webhook already moved the row on.
-- The state is compared with a column (`c.held`), not a literal: planned on empty tables, the
-- literal sent the lookup through a full scan of outbound_sending_idx instead of the key.
-- $1 id, $2 epoch, $3 error code, $4 error, $5 retry at, $6 permanent
WITH c AS MATERIALIZED (SELECT 'sending'::text AS held)
UPDATE outbound_messages o
SET state = CASE WHEN $6 OR o.attempts >= o.max_attempts THEN 'failed' ELSE 'queued' END,
    run_at = $5, error_code = $3, last_error = $4
FROM accounts a, c
WHERE o.id = $1 AND o.claim_epoch = $2 AND o.state = c.held
  AND a.id = o.account_id AND a.fence_epoch = $2
RETURNING o.state
