-- Money columns become `numeric` (issue 14): amounts are up to 2^127-1 and a balance
-- can pass that by the refunds and releases on their way back to it (streams.ledger),
-- so no fixed width fits; `numeric` without a precision holds any integer exactly.
-- Sums over it (audit, breakpoints) are numeric too, never cast back to bigint.
-- `seq` columns stay bigint: they count changes of one balance.
--
-- On a deployment that has data, ALTER ... TYPE rewrites each table (and its partitions)
-- under an ACCESS EXCLUSIVE lock, in this one transaction: stop the PostgreSQL sink
-- first; it resumes from sink_offsets afterwards. Every bigint value converts exactly.
ALTER TABLE balances
    ALTER COLUMN available TYPE numeric,
    ALTER COLUMN held      TYPE numeric;

ALTER TABLE ledger_entries
    ALTER COLUMN delta_available TYPE numeric,
    ALTER COLUMN delta_held      TYPE numeric,
    ALTER COLUMN available       TYPE numeric,
    ALTER COLUMN held            TYPE numeric;

ALTER TABLE breakpoints
    ALTER COLUMN delta_available  TYPE numeric,
    ALTER COLUMN delta_held       TYPE numeric,
    ALTER COLUMN available_before TYPE numeric,
    ALTER COLUMN held_before      TYPE numeric,
    ALTER COLUMN available_after  TYPE numeric,
    ALTER COLUMN held_after       TYPE numeric;
