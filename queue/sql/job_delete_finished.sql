-- Retention: delete completed jobs finished before $1 (dead jobs stay until replayed or removed).
-- $1 cutoff, $2 limit
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs WHERE state = 'completed' AND finished_at < $1 LIMIT $2
)
