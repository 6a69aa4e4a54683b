-- Take the account's fence for a new Lease holder: every outbound claim or completion made under
-- an older epoch fails from now on. The row lock waits for in-flight fenced claims (which hold
-- FOR SHARE on this row) to commit first.
-- $1 account id, $2 holder
UPDATE accounts
SET fence_epoch = fence_epoch + 1, fence_holder = $2, fence_updated_at = now()
WHERE id = $1
RETURNING fence_epoch
