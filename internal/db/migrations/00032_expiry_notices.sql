-- Expiry notices at several horizons (TALLY_CREDITS_EXPIRING_NOTICE=720h,168h,24h):
-- the longest is still recorded in credit_grants.expiring_notified_at, the
-- shorter ones here, one row per grant and horizon, so each is sent once.

-- +goose Up
CREATE TABLE credit_expiry_notices (
    grant_id       text        NOT NULL REFERENCES credit_grants (id),
    notice_seconds bigint      NOT NULL,
    sent_at        timestamptz NOT NULL,
    CONSTRAINT credit_expiry_notices_pkey PRIMARY KEY (grant_id, notice_seconds)
);

-- +goose Down
DROP TABLE credit_expiry_notices;
