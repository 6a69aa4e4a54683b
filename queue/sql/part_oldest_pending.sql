-- Part (not a statement): for each queue of relation :queues, the run_at of its oldest runnable
-- pending job. A successor is chained to a completing worker only if it is not younger than
-- this (FIFO fairness across conversations).
SELECT q.queue,
           (SELECT min(p.run_at) FROM jobs p
            WHERE p.queue = q.queue AND p.state = 'pending' AND p.run_at <= now()) AS run_at
    FROM (SELECT DISTINCT queue FROM :queues) q
