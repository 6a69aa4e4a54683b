-- A conversation's replies, for the agent's history and session clock and the team inbox.
-- Without it those lookups scanned every outbound row, once per turn.
CREATE INDEX outbound_messages_conversation_idx ON outbound_messages (conversation_id, created_at);
