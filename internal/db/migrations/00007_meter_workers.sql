-- +goose Up
-- The usage delivery workers alive right now, so they can split the meter
-- event rate limit between them. Each refreshes its row every few seconds
-- and deletes it on shutdown; a row whose heartbeat is old belongs to a
-- crashed worker and no longer counts.
CREATE TABLE meter_workers (
    id           text PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL
);

-- +goose Down
DROP TABLE meter_workers;
