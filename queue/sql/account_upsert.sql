-- Create or update a gateway's account row; a released row of the same id is taken back.
-- A phone number used by another account in use is a unique violation of
-- accounts_phone_number_in_use_idx (the caller names that account).
-- $1 id, $2 phone number id, $3 pool, $4 handoff message, $5 allowed contacts, $6 outbound max attempts,
-- $7 WhatsApp Business Account id (Cloud API, optional)
INSERT INTO accounts (id, phone_number_id, pool, handoff_message, allowed_contacts, outbound_max_attempts, waba_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO UPDATE SET phone_number_id = EXCLUDED.phone_number_id,
    pool = EXCLUDED.pool, handoff_message = EXCLUDED.handoff_message,
    allowed_contacts = EXCLUDED.allowed_contacts,
    outbound_max_attempts = EXCLUDED.outbound_max_attempts,
    waba_id = EXCLUDED.waba_id,
    released_at = NULL
