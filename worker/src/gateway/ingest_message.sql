-- One inbound message, whole, in one statement: the webhook's path is one round trip and one
-- commit. Returns one row: the conversation, whether its agent is on, the new message's id,
-- the agent job's id (all null for a message seen before) and whether media wait to be fetched.
--
-- Dedupe first: a redelivered message (Meta redelivers for days) touches nothing, so a closed
-- conversation is not reopened by it. Two first deliveries racing both pass the check; the loser's
-- message insert does nothing (the unique provider id) and its conversation bump is the winner's.
--
-- The job is the head of its conversation's key or queued behind it, as job_insert_active.sql
-- and job_insert_waiting.sql do in two statements: the upsert touches (locks) the active job, so
-- its completion waits for this commit and its follow-up promotion sees the waiting row.
--
-- $1 account, $2 contact key, $3 wa_id, $4 user_id, $5 display name, $6 pool (the job queue),
-- $7 provider message id, $8 type, $9 body, $10 raw payload, $11 runs the agent,
-- $12 provider timestamp, $13 job kind, $14 job max attempts. A media message ($8 image, audio,
-- video, document or sticker, with an id under $10->$8) also gets its `media` row to fetch.
WITH seen AS MATERIALIZED (
    SELECT 1 FROM inbound_messages WHERE account_id = $1 AND provider_message_id = $7
), contact AS (
    INSERT INTO contacts (account_id, contact_key, wa_id, user_id, display_name)
    SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM seen)
    ON CONFLICT (account_id, contact_key) DO UPDATE SET
        wa_id = coalesce(EXCLUDED.wa_id, contacts.wa_id),
        user_id = coalesce(EXCLUDED.user_id, contacts.user_id),
        display_name = coalesce(EXCLUDED.display_name, contacts.display_name)
    RETURNING id
), conversation AS (
    INSERT INTO conversations (account_id, contact_id, pool, last_inbound_at, last_activity_at)
    SELECT $1, contact.id, $6, now(), now() FROM contact
    ON CONFLICT (account_id, contact_id) DO UPDATE SET last_inbound_at = now(), last_activity_at = now(),
        state = CASE WHEN conversations.state = 'closed' THEN 'open' ELSE conversations.state END
    RETURNING id, agent_enabled
), message AS (
    INSERT INTO inbound_messages
        (account_id, conversation_id, provider_message_id, message_type, body, payload, runs_agent, provider_timestamp)
    SELECT $1, conversation.id, $7, $8, $9, $10, $11, $12 FROM conversation
    ON CONFLICT (account_id, provider_message_id) DO NOTHING
    RETURNING id, conversation_id
), media AS (
    -- A Cloud API media message names its media id; the Lease holder fetches the bytes later.
    INSERT INTO media (account_id, inbound_id, conversation_id, provider_media_id, kind, mime_type, sha256, filename)
    SELECT $1, m.id, m.conversation_id, $10->$8->>'id', $8, $10->$8->>'mime_type', $10->$8->>'sha256',
           $10->$8->>'filename'
    FROM message m
    WHERE $8 IN ('image', 'audio', 'video', 'document', 'sticker') AND $10->$8->>'id' IS NOT NULL
    RETURNING id
), job AS (
    SELECT $6::text AS queue, 'conversation:' || m.conversation_id AS concurrency_key,
           jsonb_build_object('v', 1, 'conversation_id', m.conversation_id, 'inbound_id', m.id) AS payload
    FROM message m WHERE $11
), active AS (
    INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts)
    SELECT queue, $13, concurrency_key, payload, 'pending', $14 FROM job
    ON CONFLICT (queue, concurrency_key) WHERE state IN ('pending', 'running') AND concurrency_key IS NOT NULL
    DO UPDATE SET concurrency_key = EXCLUDED.concurrency_key
    RETURNING id, (xmax = 0) AS inserted
), waiting AS (
    INSERT INTO jobs (queue, kind, concurrency_key, payload, state, max_attempts)
    SELECT queue, $13, concurrency_key, payload, 'waiting', $14 FROM job
    WHERE EXISTS (SELECT 1 FROM active WHERE NOT inserted)
    RETURNING id
)
SELECT (SELECT id FROM conversation), (SELECT agent_enabled FROM conversation),
       (SELECT id FROM message),
       coalesce((SELECT id FROM active WHERE inserted), (SELECT id FROM waiting)),
       EXISTS (SELECT 1 FROM media)
