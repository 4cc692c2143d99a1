-- The client's `reference` and `metadata` of a command (issue 16) on every row it wrote,
-- and the indexes the read API needs. Nullable columns without a default: adding them
-- changes no existing row (no rewrite, a brief lock only). `metadata` is jsonb so that
-- an operator can query it; the schema keeps U+0000, which jsonb cannot hold, out of it.
ALTER TABLE ledger_entries
    ADD COLUMN reference text,
    ADD COLUMN metadata  jsonb;

ALTER TABLE command_results
    ADD COLUMN reference text,
    ADD COLUMN metadata  jsonb;

-- GET /v1/commands?reference=...: the commands carrying a reference, in every shard.
-- Partial: most commands carry none, and those cost the index nothing.
CREATE INDEX command_results_by_reference ON command_results (reference, account, command_id)
    WHERE reference IS NOT NULL;

-- Balances at a past time: the last breakpoint at or before it (a shard's engine time
-- never goes back, so `created_at` grows with `to_seq` along one balance), then at most
-- `breakpoint_every` entries after it by the ledger_entries key. History pages and
-- balances at a seq need no new index: the key (shard_id, account, asset, seq) serves
-- them. Breakpoints are one row per hundred entries, so this index is cheap to keep.
CREATE INDEX breakpoints_by_time ON breakpoints (shard_id, account, asset, created_at, to_seq);
