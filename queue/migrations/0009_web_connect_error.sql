-- Why the WhatsApp Web gateway could not reach WhatsApp on its last attempt (DNS, refused,
-- TLS, no egress), for the account's status: without it a number that cannot connect looks
-- like one waiting for a pairing code. Cleared once the server answers (a code or a login).
ALTER TABLE wa_web_sessions ADD COLUMN connect_error text, ADD COLUMN connect_error_at timestamptz;
