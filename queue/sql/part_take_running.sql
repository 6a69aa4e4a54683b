-- Part (not a statement): the SET list that takes a job to `running` for a processor with a
-- fresh claim token, when :chain holds; otherwise it makes the job `pending` and leaves its
-- claim columns alone. Claims (:chain = true, folded away by the planner) and the promotions
-- that chain a successor straight to a completing worker share it, so a claimed job looks the
-- same whichever way it was taken. Heartbeats and completions must present the claim token.
-- :chain condition, :processor processor id, :lock_seconds lock length
state = CASE WHEN :chain THEN 'running' ELSE 'pending' END,
    attempts = CASE WHEN :chain THEN j.attempts + 1 ELSE j.attempts END,
    processor_id = CASE WHEN :chain THEN :processor ELSE j.processor_id END,
    claim_token = CASE WHEN :chain THEN nextval('job_claim_token_seq') ELSE j.claim_token END,
    started_at = CASE WHEN :chain THEN now() ELSE j.started_at END,
    heartbeat_at = CASE WHEN :chain THEN now() ELSE j.heartbeat_at END,
    locked_until = CASE WHEN :chain THEN now() + make_interval(secs => :lock_seconds) ELSE j.locked_until END
