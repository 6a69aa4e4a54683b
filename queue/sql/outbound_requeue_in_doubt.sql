-- A new fence holder takes over messages a deposed holder claimed but never completed. If the
-- old send did reach WhatsApp, its status webhook (matched by biz_opaque_callback_data) moves
-- the row to sent within seconds; only rows still in doubt after the grace period are queued
-- again. Conditional on the caller holding the current fence.
-- $1 account, $2 epoch, $3 grace seconds
UPDATE outbound_messages o
SET state = 'queued', run_at = now(), last_error = 'requeued: claimed under epoch ' || o.claim_epoch || ' and never completed'
FROM accounts a
WHERE o.account_id = $1 AND o.state = 'sending' AND o.claim_epoch < $2
  AND o.claimed_at < now() - make_interval(secs => $3)
  AND a.id = o.account_id AND a.fence_epoch = $2
RETURNING o.id
