-- Replace a WABA's stored templates with a complete listing, in one statement: the new and
-- changed ones are upserted, those no longer listed (deleted in WhatsApp Manager) removed.
-- $1 WABA id, $2 the listing (JSON array of gateway::templates::Template)
WITH listed AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS t(
        name text, language text, template_id text, category text, status text, body text,
        body_parameters int, components jsonb)
), upserted AS (
    INSERT INTO message_templates
        (waba_id, name, language, template_id, category, status, body, body_parameters, components, updated_at)
    SELECT $1, name, language, template_id, category, status, body, body_parameters,
           coalesce(components, '[]'), now()
    FROM listed
    ON CONFLICT (waba_id, name, language) DO UPDATE SET
        template_id = EXCLUDED.template_id, category = EXCLUDED.category,
        body = EXCLUDED.body, body_parameters = EXCLUDED.body_parameters,
        components = EXCLUDED.components,
        status_reason = CASE WHEN message_templates.status = EXCLUDED.status
                             THEN message_templates.status_reason END,
        status = EXCLUDED.status, updated_at = now()
    RETURNING 1
), removed AS (
    DELETE FROM message_templates m
    WHERE m.waba_id = $1
      AND NOT EXISTS (SELECT 1 FROM listed l WHERE l.name = m.name AND l.language = m.language)
    RETURNING 1
)
-- (Data-modifying CTEs run whether or not the main statement reads them.)
UPDATE template_syncs SET synced_at = now(), last_error = NULL WHERE waba_id = $1
