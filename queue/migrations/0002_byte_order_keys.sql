-- Queue names and concurrency keys are identifiers, never sorted for people: byte order ("C")
-- makes every index comparison on them a memcmp instead of a locale-aware strcoll. The jobs
-- indexes on these columns are rebuilt by the type change.
ALTER TABLE jobs
    ALTER COLUMN queue TYPE text COLLATE "C",
    ALTER COLUMN concurrency_key TYPE text COLLATE "C";
