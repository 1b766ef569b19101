-- +goose Up
-- Where the outbound webhook push has got to in the event feed, and which
-- instance holds the lease to push (one pusher at a time keeps order).
CREATE TABLE event_push_state (
    id          int PRIMARY KEY CHECK (id = 1),
    cursor_txid xid8 NOT NULL DEFAULT '0',
    cursor_id   bigint NOT NULL DEFAULT 0,
    holder      text,
    lease_until timestamptz,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO event_push_state (id) VALUES (1);

-- +goose Down
DROP TABLE event_push_state;
