-- Outbound counters per account (status of WhatsAppAccount, metrics), and what happened in the
-- last five minutes (sends accepted, messages failed for good).
SELECT account_id,
       count(*) FILTER (WHERE state = 'queued')                        AS queued,
       count(*) FILTER (WHERE state = 'sending')                       AS sending,
       count(*) FILTER (WHERE state IN ('sent', 'delivered', 'read'))  AS sent,
       count(*) FILTER (WHERE state = 'failed')                        AS failed,
       count(*) FILTER (WHERE sent_at > now() - interval '5 minutes')  AS sent_recently,
       count(*) FILTER (WHERE state = 'failed'
                        AND coalesce(status_at, claimed_at) > now() - interval '5 minutes') AS failed_recently
FROM outbound_messages
GROUP BY account_id
