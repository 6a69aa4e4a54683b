-- Claim a number's media that are due for a fetch, oldest first, and count the attempt. A
-- claimed row is not due again for $3 seconds: if the holder dies mid-download, the next one
-- retries it then. SKIP LOCKED: a deposed holder still finishing a round never waits on the
-- new one.
-- $1 account, $2 how many, $3 claim seconds
UPDATE media m SET attempts = m.attempts + 1,
                   next_attempt_at = now() + make_interval(secs => $3)
WHERE m.id IN (
    SELECT id FROM media
    WHERE account_id = $1 AND state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING m.id, m.conversation_id, m.provider_media_id, m.kind, m.sha256, m.attempts,
          (SELECT i.payload -> m.kind -> 'download' FROM inbound_messages i WHERE i.id = m.inbound_id) AS download
