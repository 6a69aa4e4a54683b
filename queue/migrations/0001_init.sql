-- Initial schema. Never edit a merged migration: sqlx checks its hash. Add a new file instead.

-- One row per WhatsApp account (phone number). fence_epoch is bumped by every gateway that
-- acquires the account's Lease; outbound claims and completions are conditional on it.
CREATE TABLE accounts (
    id               text PRIMARY KEY,                 -- "<namespace>/<name>"
    phone_number_id  text NOT NULL UNIQUE,
    pool             text NOT NULL,                    -- queue name of the AgentPool
    handoff_message  text NOT NULL DEFAULT 'Thanks! A member of our team will reply here shortly.',
    allowed_contacts text[] NOT NULL DEFAULT '{}',
    fence_epoch      bigint NOT NULL DEFAULT 0,
    fence_holder     text,
    fence_updated_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE contacts (
    id           bigserial PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    contact_key  text NOT NULL,     -- business-scoped user id when present, else wa_id
    wa_id        text,
    user_id      text,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, contact_key)
);

CREATE TABLE conversations (
    id                 bigserial PRIMARY KEY,
    account_id         text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    contact_id         bigint NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    pool               text NOT NULL,
    lane               text,
    agent_enabled      boolean NOT NULL DEFAULT true,
    state              text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'handed_off', 'closed')),
    session_started_at timestamptz NOT NULL DEFAULT now(),
    last_inbound_at    timestamptz,
    last_activity_at   timestamptz NOT NULL DEFAULT now(),
    answered_through   bigint NOT NULL DEFAULT 0,   -- highest inbound_messages.id an agent turn answered
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, contact_id)
);

-- Inbound dedupe: Meta redelivers webhooks for up to 7 days and to every subscribed app.
CREATE TABLE inbound_messages (
    id                  bigserial PRIMARY KEY,
    account_id          text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    conversation_id     bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    provider_message_id text NOT NULL,
    message_type        text NOT NULL,
    body                text,
    payload             jsonb NOT NULL,
    runs_agent          boolean NOT NULL,
    provider_timestamp  timestamptz,
    received_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, provider_message_id)
);
CREATE INDEX inbound_messages_conversation_idx ON inbound_messages (conversation_id, id);

-- Jobs. States:
--   waiting   another job of the same concurrency_key is pending or running; promoted in order
--   pending   claimable once run_at <= now()
--   running   claimed; lock held until locked_until, extended by heartbeats
--   completed done (outcome says how)
--   dead      out of attempts; kept for inspection and replay
CREATE SEQUENCE job_claim_token_seq CACHE 100;
CREATE TABLE jobs (
    id              bigserial PRIMARY KEY,
    queue           text NOT NULL,
    kind            text NOT NULL,
    concurrency_key text,
    payload         jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL CHECK (state IN ('waiting', 'pending', 'running', 'completed', 'dead')),
    outcome         text,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 5,
    run_at          timestamptz NOT NULL DEFAULT now(),
    processor_id    text,
    claim_token     bigint,
    locked_until    timestamptz,
    started_at      timestamptz,
    heartbeat_at    timestamptz,
    finished_at     timestamptz,
    last_error      text,
    replayed_as     bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- The claim scans this index only: pending jobs, oldest first.
CREATE INDEX jobs_pending_idx ON jobs (queue, run_at, id) WHERE state = 'pending';
-- At most one pending-or-running job per key: the database, not luck, serializes a conversation.
CREATE UNIQUE INDEX jobs_one_active_per_key_idx ON jobs (queue, concurrency_key)
    WHERE state IN ('pending', 'running') AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_waiting_idx ON jobs (queue, concurrency_key, id) WHERE state = 'waiting';
CREATE INDEX jobs_running_lock_idx ON jobs (locked_until) WHERE state = 'running';
CREATE INDEX jobs_dead_idx ON jobs (queue, id) WHERE state = 'dead';
-- Every index here costs an insert on each state change (state is in every predicate, so no
-- update is HOT): stats and retention are written to use these partial indexes and no others.

-- The transactional outbox of agent turns. Delivery states only move forward:
-- queued < sending < sent < delivered < read, and failed is terminal.
CREATE TABLE outbound_messages (
    id                  bigserial PRIMARY KEY,
    account_id          text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    conversation_id     bigint REFERENCES conversations(id) ON DELETE CASCADE,
    job_id              bigint,
    recipient           text NOT NULL,
    message             jsonb NOT NULL,   -- the Cloud API message object minus messaging_product/to
    sent_by_agent       boolean NOT NULL DEFAULT false,
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'sending', 'sent', 'delivered', 'read', 'failed')),
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 8,
    run_at              timestamptz NOT NULL DEFAULT now(),
    claim_epoch         bigint,
    claimed_by          text,
    claimed_at          timestamptz,
    provider_message_id text UNIQUE,
    error_code          integer,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    status_at           timestamptz
);
CREATE INDEX outbound_queued_idx ON outbound_messages (account_id, id) WHERE state = 'queued';
CREATE INDEX outbound_in_flight_idx ON outbound_messages (conversation_id, id) WHERE state IN ('queued', 'sending');
CREATE INDEX outbound_sending_idx ON outbound_messages (account_id, claimed_at) WHERE state = 'sending';

CREATE TABLE team_members (
    pool             text NOT NULL,
    member_id        text NOT NULL,
    display_name     text,
    online           boolean NOT NULL DEFAULT true,
    last_assigned_at timestamptz,
    PRIMARY KEY (pool, member_id)
);

CREATE TABLE handoff_tasks (
    id              bigserial PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    pool            text NOT NULL,
    assignee        text,
    reason          text,
    state           text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    closed_at       timestamptz
);
CREATE INDEX handoff_tasks_open_idx ON handoff_tasks (pool, created_at) WHERE state = 'open';

-- Tool plugins that failed validation, per pool, for operators (and the AgentPool status).
CREATE TABLE plugin_diagnostics (
    pool        text NOT NULL,
    plugin_id   text NOT NULL,
    field       text NOT NULL,
    message     text NOT NULL,
    observed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, plugin_id, field)
);

-- One row per agent turn: what ran, how long, how many tokens.
CREATE TABLE agent_turns (
    id                bigserial PRIMARY KEY,
    job_id            bigint NOT NULL,
    conversation_id   bigint NOT NULL,
    provider          text NOT NULL,
    outcome           text NOT NULL,
    steps             integer NOT NULL DEFAULT 0,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    latency_ms        integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_turns_conversation_idx ON agent_turns (conversation_id, id);
