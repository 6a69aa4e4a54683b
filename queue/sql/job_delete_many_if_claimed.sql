-- Complete jobs still held under their claim tokens by deleting them (for queues configured not
-- to keep completed jobs: one dead tuple and no index inserts instead of a new row version).
-- Returns the keys so the caller promotes the next waiting job of each.
-- $1 ids bigint[], $2 claim tokens bigint[]
DELETE FROM jobs j
USING unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE j.id = c.id AND j.claim_token = c.token AND j.state = 'running'
RETURNING j.id, j.queue, j.concurrency_key
