-- Outbound counters per account (status of WhatsAppAccount, metrics).
SELECT account_id,
       count(*) FILTER (WHERE state = 'queued')                        AS queued,
       count(*) FILTER (WHERE state = 'sending')                       AS sending,
       count(*) FILTER (WHERE state IN ('sent', 'delivered', 'read'))  AS sent,
       count(*) FILTER (WHERE state = 'failed')                        AS failed
FROM outbound_messages
GROUP BY account_id
