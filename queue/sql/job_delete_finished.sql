-- Retention: delete completed jobs finished before $1, oldest ids first (primary key order, so
-- no index on finished_at is needed). Dead jobs stay until replayed or removed by hand.
-- $1 cutoff, $2 limit
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs WHERE state = 'completed' AND finished_at < $1 ORDER BY id LIMIT $2
)
