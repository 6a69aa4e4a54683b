-- The human side of handoff: who sent a human reply, when a task was claimed and first answered,
-- and an audit trail of what team members did.

-- The team member who wrote a human reply (sent_by_agent = false); NULL for agent replies.
ALTER TABLE outbound_messages ADD COLUMN sent_by_member text;

ALTER TABLE handoff_tasks
    ADD COLUMN claimed_at     timestamptz,  -- last claim or assignment by a person
    ADD COLUMN first_reply_at timestamptz,  -- the first human reply: time to first reply
    ADD COLUMN closed_by      text;         -- member who resumed the agent or closed it
-- One open task per conversation: a second handoff (or a human taking over) joins the open one,
-- and concurrent claims race on one row.
CREATE UNIQUE INDEX handoff_tasks_one_open_idx ON handoff_tasks (conversation_id) WHERE state = 'open';

-- Who did what. Kept forever by default; it is small (one row per human action).
CREATE TABLE team_audit (
    id              bigserial PRIMARY KEY,
    pool            text NOT NULL,
    member_id       text NOT NULL,
    action          text NOT NULL,   -- claim, assign, reply, resume, close, refused_reply
    conversation_id bigint,
    detail          jsonb NOT NULL DEFAULT '{}',
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX team_audit_pool_idx ON team_audit (pool, id);
CREATE INDEX team_audit_conversation_idx ON team_audit (conversation_id, id);
