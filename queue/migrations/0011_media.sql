-- Media that customers send (image, audio, video, document, sticker). The webhook only names a
-- media id; the bytes are fetched afterwards by the number's Lease holder (the one with the
-- access token), never in the webhook's 200 path, retried with backoff, size-limited, and kept
-- here (TOASTed bytea) for the team inbox until the retention period ends.
--
-- States: pending (to fetch; next_attempt_at says when), stored (content holds the bytes),
-- too_large (over the account's limit: not stored), failed (gave up: last_error says why),
-- expired (the retention period ended: the bytes were dropped, the row stays for the transcript).
CREATE TABLE media (
    id                bigserial PRIMARY KEY,
    account_id        text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    inbound_id        bigint NOT NULL UNIQUE REFERENCES inbound_messages(id) ON DELETE CASCADE,
    conversation_id   bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    provider_media_id text NOT NULL,
    kind              text NOT NULL,
    mime_type         text,
    sha256            text,          -- as the webhook gives it
    filename          text,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'stored', 'too_large', 'failed', 'expired')),
    attempts          int NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_error        text,
    size_bytes        bigint,
    content           bytea,
    fetched_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX media_pending_idx ON media (account_id, next_attempt_at) WHERE state = 'pending';
CREATE INDEX media_stored_idx ON media (fetched_at) WHERE state = 'stored';
