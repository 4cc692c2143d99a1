-- Idempotency is scoped by (account, command_id) (issue #13): the same command id on two
-- accounts is two commands, each with its own first decision, whatever their shards.
-- The key grows by the account; every row already there keeps its one decision (under
-- the old, shard-scoped key no shard held two rows of one id, so none collide).
ALTER TABLE command_results DROP CONSTRAINT command_results_pkey;
ALTER TABLE command_results ADD PRIMARY KEY (shard_id, account, command_id);
