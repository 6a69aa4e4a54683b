-- Per-account settings the senders and the outbox read, and phone numbers that can be used again.

-- WhatsAppAccount spec.delivery.maxAttempts: attempts of each outbound message of the account
-- (stored per row at enqueue, from here when the enqueue does not say).
ALTER TABLE accounts ADD COLUMN outbound_max_attempts int NOT NULL DEFAULT 8;

-- A deleted WhatsAppAccount releases its phone number: the row (and its history) stays, marked
-- released, and the number is unique only among accounts in use.
ALTER TABLE accounts ADD COLUMN released_at timestamptz;
ALTER TABLE accounts DROP CONSTRAINT accounts_phone_number_id_key;
CREATE UNIQUE INDEX accounts_phone_number_in_use_idx ON accounts (phone_number_id)
    WHERE released_at IS NULL;
