-- WhatsApp Web accounts: the linked device's session lives here, so a replaced gateway pod
-- comes back connected without re-pairing. Every write to these tables is conditional on the
-- account's fence_epoch (see whatsapp-web store): a deposed holder cannot write session state.

-- What the account's socket is doing, written by the Lease holder, read by the operator.
CREATE TABLE wa_web_sessions (
    account_id      text PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'unpaired'
                    CHECK (state IN ('unpaired', 'pairing', 'connecting', 'connected', 'disconnected', 'logged_out')),
    device_jid      text,                 -- our linked device, once paired
    pairing_method  text,                 -- QrCode | PairCode
    qr_code         text,
    pair_code       text,
    code_expires_at timestamptz,
    detail          text,                 -- the last reason, in words
    holder          text,                 -- the pod that wrote this row
    connected_since timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The device identity (keys, registration id, push name, ...), one serialized row per account.
CREATE TABLE wa_web_devices (
    account_id text PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    device     bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Opaque records by kind: Signal identities, sessions, signed pre-keys, sender keys, app-state
-- sync keys and versions, base keys, device lists, group metadata. The client serializes them.
CREATE TABLE wa_web_records (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    kind       text NOT NULL,
    key        text NOT NULL,
    value      bytea NOT NULL,
    PRIMARY KEY (account_id, kind, key)
);

CREATE TABLE wa_web_prekeys (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    id         bigint NOT NULL,
    record     bytea NOT NULL,
    uploaded   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (account_id, id)
);

CREATE TABLE wa_web_mutation_macs (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    collection text NOT NULL,
    index_mac  bytea NOT NULL,
    version    bigint NOT NULL,
    value_mac  bytea NOT NULL,
    PRIMARY KEY (account_id, collection, index_mac)
);

CREATE TABLE wa_web_lid_mappings (
    account_id      text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    lid             text NOT NULL,
    phone_number    text NOT NULL,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    learning_source text NOT NULL,
    PRIMARY KEY (account_id, lid)
);
CREATE INDEX wa_web_lid_mappings_by_phone ON wa_web_lid_mappings (account_id, phone_number, updated_at DESC);

CREATE TABLE wa_web_sender_key_devices (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    group_jid  text NOT NULL,
    device_jid text NOT NULL,
    has_key    boolean NOT NULL,
    PRIMARY KEY (account_id, group_jid, device_jid)
);

CREATE TABLE wa_web_tc_tokens (
    account_id       text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    jid              text NOT NULL,
    token            bytea NOT NULL,
    token_timestamp  bigint NOT NULL,
    sender_timestamp bigint,
    PRIMARY KEY (account_id, jid)
);

-- Sent payloads kept for retry receipts, and decrypted inbound messages awaiting their commit.
CREATE TABLE wa_web_sent_messages (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    chat       text NOT NULL,
    message_id text NOT NULL,
    payload    bytea NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (account_id, chat, message_id)
);

CREATE TABLE wa_web_pending_inbound (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    chat       text NOT NULL,
    sender     text NOT NULL,
    id         text NOT NULL,
    message    bytea NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (account_id, chat, sender, id)
);

CREATE TABLE wa_web_msg_secrets (
    account_id text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    chat       text NOT NULL,
    sender     text NOT NULL,
    msg_id     text NOT NULL,
    secret     bytea NOT NULL,
    expires_at bigint NOT NULL,
    message_ts bigint NOT NULL,
    PRIMARY KEY (account_id, chat, sender, msg_id)
);
