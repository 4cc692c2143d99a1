-- The PostgreSQL projection of the events topic. Every table is partitioned by shard_id,
-- the same shard as the Kafka partition and the Redis hash tag; `tally migrate` creates
-- one partition per shard (TALLY_PARTITIONS) after this file. Each deployment (topic
-- prefix) has its own schema; the runner sets search_path. Times are the events' own
-- times, never now(), so a replay writes the same bytes.

-- The latest balance per (account, asset). Only moves forward: upserts keep the row
-- with the higher seq.
CREATE TABLE balances (
    shard_id   integer NOT NULL,
    account    text    NOT NULL,
    asset      text    NOT NULL,
    available  bigint  NOT NULL,
    held       bigint  NOT NULL,
    seq        bigint  NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (shard_id, account, asset)
) PARTITION BY LIST (shard_id);

-- One row per balance change, insert-only: no foreign keys, no index beyond the key.
CREATE TABLE ledger_entries (
    shard_id        integer NOT NULL,
    account         text    NOT NULL,
    asset           text    NOT NULL,
    seq             bigint  NOT NULL,
    command_id      text    NOT NULL,
    kind            text    NOT NULL,
    delta_available bigint  NOT NULL,
    delta_held      bigint  NOT NULL,
    available       bigint  NOT NULL,
    held            bigint  NOT NULL,
    at              timestamptz NOT NULL,
    PRIMARY KEY (shard_id, account, asset, seq)
) PARTITION BY LIST (shard_id);

-- The first decision per command id (per shard, as the engine keeps them). Repeats
-- (`duplicate`, `command_id_reused`) stay in the events topic only.
CREATE TABLE command_results (
    shard_id   integer NOT NULL,
    command_id text    NOT NULL,
    account    text    NOT NULL,
    kind       text    NOT NULL,
    status     text    NOT NULL,
    reason     text,
    at         timestamptz NOT NULL,
    PRIMARY KEY (shard_id, command_id)
) PARTITION BY LIST (shard_id);

-- Every `breakpoint_every`-th seq of a balance: the sum of the changes since the
-- previous breakpoint and the balance before and after them. A balance is the last
-- breakpoint's `*_after` plus the deltas of the entries after its to_seq.
CREATE TABLE breakpoints (
    shard_id         integer NOT NULL,
    account          text    NOT NULL,
    asset            text    NOT NULL,
    from_seq         bigint  NOT NULL,
    to_seq           bigint  NOT NULL,
    delta_available  bigint  NOT NULL,
    delta_held       bigint  NOT NULL,
    available_before bigint  NOT NULL,
    held_before      bigint  NOT NULL,
    available_after  bigint  NOT NULL,
    held_after       bigint  NOT NULL,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (shard_id, account, asset, to_seq)
) PARTITION BY LIST (shard_id);

-- Where the PostgreSQL sink is in the events topic, written in the same transaction as
-- the rows: a batch and its offsets commit together.
CREATE TABLE sink_offsets (
    topic      text    NOT NULL,
    partition  integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
