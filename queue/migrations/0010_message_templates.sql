-- Message templates of each WhatsApp Business Account (WABA), as the Graph API lists them.
-- Templates belong to the WABA, not to a number: numbers of one WABA share this list. The
-- holder of any of its numbers refreshes it (`template_syncs` says when it was last done, so
-- that several numbers of one WABA do not all list it), and the template status webhook
-- (`message_template_status_update`) moves a template's status as soon as Meta decides.
ALTER TABLE accounts ADD COLUMN waba_id text;

CREATE TABLE message_templates (
    waba_id         text NOT NULL,
    name            text NOT NULL,
    language        text NOT NULL,
    template_id     text NOT NULL,      -- Meta's id, what status webhooks name
    category        text,
    status          text NOT NULL,      -- APPROVED, PENDING, REJECTED, PAUSED, DISABLED, ...
    body            text,               -- the BODY component's text, with {{1}}.. placeholders
    body_parameters int NOT NULL DEFAULT 0,
    components      jsonb NOT NULL DEFAULT '[]',
    status_reason   text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (waba_id, name, language)
);
CREATE INDEX message_templates_id_idx ON message_templates (waba_id, template_id);

CREATE TABLE template_syncs (
    waba_id      text PRIMARY KEY,
    -- When a holder last took the listing on (done or not); the next is due a refresh later.
    started_at   timestamptz NOT NULL,
    synced_at    timestamptz,
    -- A status webhook for a template not listed yet asks for a listing now.
    requested_at timestamptz,
    last_error   text
);
