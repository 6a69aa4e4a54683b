-- Queue outbound messages and wake their accounts' senders (delivered at commit), in one
-- statement. Rows are inserted in input order, so ids (the send order within a conversation)
-- follow it; they are returned in that order.
-- $1 accounts, $2 conversations, $3 jobs, $4 recipients, $5 messages, $6 sent by agent,
-- $7 sent by member, $8 max attempts (arrays, one entry per message; a null attempts entry takes
-- the account's spec.delivery.maxAttempts), $9 notify channel
WITH inserted AS (
    INSERT INTO outbound_messages
        (account_id, conversation_id, job_id, recipient, message, sent_by_agent, sent_by_member, max_attempts)
    SELECT t.account_id, t.conversation_id, t.job_id, t.recipient, t.message, t.sent_by_agent, t.sent_by_member,
           coalesce(t.max_attempts,
                    (SELECT a.outbound_max_attempts FROM accounts a WHERE a.id = t.account_id), 8)
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::jsonb[],
                $6::bool[], $7::text[], $8::int[]) WITH ORDINALITY
         AS t(account_id, conversation_id, job_id, recipient, message, sent_by_agent, sent_by_member, max_attempts, n)
    ORDER BY t.n
    RETURNING id, account_id
), notified AS (
    SELECT count(pg_notify($9, account_id)) AS n FROM (SELECT DISTINCT account_id FROM inserted) a
)
SELECT id FROM inserted CROSS JOIN notified ORDER BY id
