-- Gateway fleets (one per AgentPool) and the namespace's shared webhook ingress.

-- Verified webhook changes for a phone number id that no WhatsAppAccount names yet: Meta may
-- start delivering before the account is applied. Kept (bounded, for days) and replayed through
-- the ordinary ingest when the account appears, so nothing Meta was answered 200 for is lost.
CREATE TABLE unrouted_webhooks (
    id              bigserial PRIMARY KEY,
    namespace       text NOT NULL,
    phone_number_id text NOT NULL,
    value           jsonb NOT NULL,        -- one entry[].changes[].value, as Meta sent it
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unrouted_webhooks_by_number ON unrouted_webhooks (namespace, phone_number_id, id);
CREATE INDEX unrouted_webhooks_by_age ON unrouted_webhooks (received_at);

-- Members of a pool's gateway fleet: each pod heartbeats here while it can reach the API
-- server, and every pod sizes its fair share of the pool's Leases from the live count.
CREATE TABLE gateway_members (
    pool      text NOT NULL,
    identity  text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, identity)
);
