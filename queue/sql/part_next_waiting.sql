-- Part (not a statement): the oldest waiting job of key (:queue, :key), one probe of
-- jobs_waiting_idx; :after narrows it to ids past a just-finished job. Every promotion of "the
-- next job of a key" reads its head through this.
SELECT w.id, w.run_at, w.state FROM jobs w
        WHERE w.queue = :queue AND w.concurrency_key = :key AND w.state = 'waiting'
          AND w.id > :after
        ORDER BY w.id
        LIMIT 1
