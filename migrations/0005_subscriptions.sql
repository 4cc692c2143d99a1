-- Subscriptions (#17): result events pushed to HTTP endpoints by `tally notify`.
-- A filter list that is empty matches everything; a subscription gets the events the
-- engine decided at or after its creation (at_ms >= created_at_ms).
CREATE TABLE subscriptions (
    id text PRIMARY KEY,
    url text NOT NULL,
    secret text NOT NULL,
    accounts text[] NOT NULL DEFAULT '{}',
    account_prefixes text[] NOT NULL DEFAULT '{}',
    statuses text[] NOT NULL DEFAULT '{}',
    kinds text[] NOT NULL DEFAULT '{}',
    paused boolean NOT NULL DEFAULT false,
    created_at_ms bigint NOT NULL
);

-- Per subscription and events partition: every event before next_offset is acknowledged
-- by the subscriber or parked as failed (at-least-once: the notifier resumes here).
CREATE TABLE subscription_progress (
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (subscription_id, topic, partition)
);

-- Deliveries given up after the retry horizon (status 'failed'), kept for inspection.
CREATE TABLE subscription_deliveries (
    delivery_id text PRIMARY KEY,
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    status text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    command_id text NOT NULL,
    account text NOT NULL,
    attempts integer NOT NULL,
    last_error text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX subscription_deliveries_by_status
    ON subscription_deliveries (subscription_id, status, at_ms);

-- Redeliveries on request: a subscription's events decided within [from_ms, to_ms],
-- delivered again by the notifier, then marked done.
CREATE TABLE subscription_redeliveries (
    id text PRIMARY KEY,
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    from_ms bigint NOT NULL,
    to_ms bigint NOT NULL,
    done boolean NOT NULL DEFAULT false
);
