-- Per subscription, events partition and delivery lane (#17): the offset of the last
-- event the lane has done (acknowledged by the subscriber or parked as failed), stored
-- before the lane sends its next event. A lane delivers its events of a partition one at
-- a time in offset order, so every event of that lane at or below done_offset is done: a
-- notifier resuming from the partition's next_offset (subscription_progress) skips them
-- and repeats only what a lane had in flight. An account's lane is
-- crc32(account) % lanes; rows of a lane count other than the notifier's are not used.
CREATE TABLE subscription_lanes (
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    topic text NOT NULL,
    partition integer NOT NULL,
    lanes integer NOT NULL,
    lane integer NOT NULL,
    done_offset bigint NOT NULL,
    PRIMARY KEY (subscription_id, topic, partition, lanes, lane)
);
