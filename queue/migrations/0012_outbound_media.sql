-- Files a team member sends (an image, a PDF, ...). The outbound message names the row
-- (`<kind>.outbound_media_id`); the Lease holder uploads the bytes to the Cloud API when it
-- first sends the message and keeps the media id it got (valid 30 days), so a retry does not
-- upload again.
CREATE TABLE outbound_media (
    id                bigserial PRIMARY KEY,
    account_id        text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    conversation_id   bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    mime_type         text NOT NULL,
    filename          text,
    content           bytea NOT NULL,
    size_bytes        bigint NOT NULL,
    provider_media_id text,
    uploaded_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
