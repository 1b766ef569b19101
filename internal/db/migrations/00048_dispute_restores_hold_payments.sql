-- +goose Up
-- A won dispute gives back what its revoke took and what holds paid of its
-- shortfall later (credit_hold_claims, 00047): restored plus expired may
-- exceed credits_revoked, never what the dispute took in all (taken plus
-- short). The old bound made such a win fail its constraint, and the
-- dispute's closed event was parked with the credits never given back.
ALTER TABLE payment_disputes DROP CONSTRAINT payment_disputes_credits_check;
ALTER TABLE payment_disputes ADD CONSTRAINT payment_disputes_credits_check CHECK (credits_revoked >= 0 AND credits_shortfall >= 0
    AND credits_restored >= 0 AND credits_expired >= 0 AND credits_restored + credits_expired <= credits_revoked + credits_shortfall);

-- +goose Down
ALTER TABLE payment_disputes DROP CONSTRAINT payment_disputes_credits_check;
ALTER TABLE payment_disputes ADD CONSTRAINT payment_disputes_credits_check CHECK (credits_revoked >= 0 AND credits_shortfall >= 0
    AND credits_restored >= 0 AND credits_expired >= 0 AND credits_restored + credits_expired <= credits_revoked);
