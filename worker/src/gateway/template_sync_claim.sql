-- Take a WABA's template listing on when it is due: never listed, listed longer ago than the
-- refresh period ($2 seconds), or asked for by a status webhook. One row per WABA, so holders of
-- several numbers of one WABA list it once. Returns a row only when this caller is to list.
-- $1 WABA id, $2 refresh period (seconds)
INSERT INTO template_syncs (waba_id, started_at) VALUES ($1, now())
ON CONFLICT (waba_id) DO UPDATE SET started_at = now(), requested_at = NULL
WHERE template_syncs.started_at < now() - make_interval(secs => $2)
   OR template_syncs.requested_at IS NOT NULL
RETURNING 1
