-- The phone removed this linked device: everything of its identity goes, so the next pairing
-- (possibly with another phone) starts from nothing, as the library's own stores do on logout:
-- the device (keys, registration), Signal sessions and identities, pre-keys, sender keys,
-- app-state keys and MACs, LID mappings, privacy tokens, sent-message and message-secret
-- caches, and undecrypted inbound. The session row (state, for the operator) and the
-- conversation history stay. Runs inside PgStore's fenced transaction: a deposed holder
-- forgets nothing.
-- $1 account
WITH devices AS (DELETE FROM wa_web_devices WHERE account_id = $1 RETURNING 1),
records AS (DELETE FROM wa_web_records WHERE account_id = $1 RETURNING 1),
prekeys AS (DELETE FROM wa_web_prekeys WHERE account_id = $1 RETURNING 1),
macs AS (DELETE FROM wa_web_mutation_macs WHERE account_id = $1 RETURNING 1),
lids AS (DELETE FROM wa_web_lid_mappings WHERE account_id = $1 RETURNING 1),
sender_keys AS (DELETE FROM wa_web_sender_key_devices WHERE account_id = $1 RETURNING 1),
tokens AS (DELETE FROM wa_web_tc_tokens WHERE account_id = $1 RETURNING 1),
sent AS (DELETE FROM wa_web_sent_messages WHERE account_id = $1 RETURNING 1),
pending AS (DELETE FROM wa_web_pending_inbound WHERE account_id = $1 RETURNING 1),
secrets AS (DELETE FROM wa_web_msg_secrets WHERE account_id = $1 RETURNING 1)
SELECT (SELECT count(*) FROM devices) + (SELECT count(*) FROM records)
     + (SELECT count(*) FROM prekeys) + (SELECT count(*) FROM macs)
     + (SELECT count(*) FROM lids) + (SELECT count(*) FROM sender_keys)
     + (SELECT count(*) FROM tokens) + (SELECT count(*) FROM sent)
     + (SELECT count(*) FROM pending) + (SELECT count(*) FROM secrets) AS forgotten
