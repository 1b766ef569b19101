-- The CHECK constraints the credited webhook path writes through, in a form
-- PostgreSQL prepares faster, with the same meaning (issue 11).
--
-- PostgreSQL 15 does not keep a table's CHECK expressions between
-- statements: every INSERT or UPDATE reads each one back from its stored
-- node text (pg_constraint.conbin), simplifies it and compiles it before
-- checking the first row, whatever columns the statement writes. On the
-- credited webhook (tally-bench webhook-credited: two payments UPDATEs,
-- about 2.5 stripe_events INSERTs, a grant, its ledger entry and a
-- transition per credited payment) that was a sixth of PostgreSQL's CPU in
-- perf, mostly reading node text (pg_strtok, strtol), and dropping every
-- CHECK of those tables in a scratch database raised the rate from about
-- 400 to 470 credited/s. The checks stay; what costs is their size:
--
-- * A list of allowed values written IN ('a', 'b') is stored as an ARRAY[]
--   of one constant node per value, each spelled out byte by byte, and
--   folded into an array again at every statement. Written as one array
--   constant, = ANY ('{a,b}'::text[]), it is stored and used as is.
-- * "x IS NULL OR x >= 0" is "x >= 0" for a CHECK, which passes when its
--   expression is true or NULL (as "effective_at < expires_at" passes when
--   either is NULL), as long as it stands alone or as one of the ANDed
--   parts: an AND is false only when one of its parts is false. The NULL
--   tests that mean something ((a IS NULL) = (b IS NULL), a OR between two
--   columns) stay.
--
-- The node text of these five tables' checks goes from 32,500 to 24,600
-- characters (payments' from 15,400 to 11,000, read twice per credited
-- payment). Constraint names do not change. Each constraint is replaced in
-- one statement, NOT VALID so that it takes its table's lock only for the
-- catalog change (new rows are checked from then on), then validated
-- without blocking writes. It runs outside a transaction, so that each
-- statement's lock is given back as soon as that statement is done. Every
-- statement is safe to run again.
--
-- Waiting for that lock queues every later reader and writer of the table
-- behind it: behind a long reader (a report, pg_dump) all writes to
-- payments stopped for as long as the reader ran (4.1 s of no writes behind
-- a 5 s reader, 2026-12-01). So each replacement asks for its lock for at
-- most 100 ms (lock_timeout), steps aside for 0.1 to 0.3 s and asks again,
-- for up to 5 minutes before the migration fails (running it again is
-- safe); a write waits at most about 100 ms. tally_ddl_with_lock_retry
-- exists only while the migration runs.

-- +goose NO TRANSACTION

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION tally_ddl_with_lock_retry(p_sql text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + interval '5 minutes';
BEGIN
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            EXECUTE p_sql;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() > v_deadline THEN
                RAISE;
            END IF;
        END;
        PERFORM pg_sleep(0.1 + random() * 0.2);
    END LOOP;
END $$;
-- +goose StatementEnd
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_amounts_check, ADD CONSTRAINT payments_amounts_check
    CHECK (unit_amount >= 0 AND amount >= 0 AND amount_refunded >= 0 AND amount_received >= 0) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_checkout_totals_check, ADD CONSTRAINT payments_checkout_totals_check
    CHECK ((checkout_currency IS NULL) = (checkout_amount_subtotal IS NULL) AND (checkout_currency IS NULL) = (checkout_amount_total IS NULL)
        AND (checkout_source_currency IS NULL) = (checkout_source_amount_subtotal IS NULL)
        AND checkout_amount_subtotal >= 0 AND checkout_amount_total >= 0 AND checkout_amount_tax >= 0) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_confirm_on_check, ADD CONSTRAINT payments_confirm_on_check
    CHECK (confirm_on = ANY ('{payment_intent,checkout_session}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_confirmed_by_check, ADD CONSTRAINT payments_confirmed_by_check
    CHECK (confirmed_by = ANY ('{payment_intent,checkout_session,invoice,sync}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_credits_expiry_check, ADD CONSTRAINT payments_credits_expiry_check
    CHECK (credits_expire_after_months > 0 AND credits_expire_after_seconds > 0
        AND (credits_expire_after_months IS NULL OR credits_expire_after_seconds IS NULL)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_item_kind_check, ADD CONSTRAINT payments_item_kind_check
    CHECK (item_kind = ANY ('{credit_pack,product,plan}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_method_check, ADD CONSTRAINT payments_method_check
    CHECK (method = ANY ('{checkout,invoice,auto_top_up}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_status_before_dispute_check, ADD CONSTRAINT payments_status_before_dispute_check
    CHECK (status_before_dispute = ANY ('{succeeded,refunded}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_status_check, ADD CONSTRAINT payments_status_check
    CHECK (status = ANY ('{pending,succeeded,failed,refunded,disputed,dispute_lost}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_status_check, ADD CONSTRAINT stripe_events_status_check
    CHECK (status = ANY ('{received,processed,ignored,failed,parked,dismissed}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_source_check, ADD CONSTRAINT stripe_events_source_check
    CHECK (source = ANY ('{webhook,sync}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payment_transitions DROP CONSTRAINT payment_transitions_source_check, ADD CONSTRAINT payment_transitions_source_check
    CHECK (source = ANY ('{api,webhook,sync,operator}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_category, ADD CONSTRAINT credit_grants_category
    CHECK (category = ANY ('{paid,promotional}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_source, ADD CONSTRAINT credit_grants_source
    CHECK (source = ANY ('{purchase,service,dispute_won}'::text[])) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_purchase_payment, ADD CONSTRAINT credit_grants_purchase_payment
    CHECK ((source = ANY ('{purchase,dispute_won}'::text[])) = (payment_id IS NOT NULL)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_effective_before_expiry, ADD CONSTRAINT credit_grants_effective_before_expiry
    CHECK (effective_at < expires_at) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind, ADD CONSTRAINT credit_ledger_kind
    CHECK (kind = ANY ('{grant,consume,expire,revoke,adjust,void}'::text[])) NOT VALID$ddl$);

ALTER TABLE payments VALIDATE CONSTRAINT payments_amounts_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_checkout_totals_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_confirm_on_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_confirmed_by_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_credits_expiry_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_item_kind_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_method_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_status_before_dispute_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_status_check;
ALTER TABLE stripe_events VALIDATE CONSTRAINT stripe_events_status_check;
ALTER TABLE stripe_events VALIDATE CONSTRAINT stripe_events_source_check;
ALTER TABLE payment_transitions VALIDATE CONSTRAINT payment_transitions_source_check;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_category;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_source;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_purchase_payment;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_effective_before_expiry;
ALTER TABLE credit_ledger VALIDATE CONSTRAINT credit_ledger_kind;

DROP FUNCTION tally_ddl_with_lock_retry(text);

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION tally_ddl_with_lock_retry(p_sql text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + interval '5 minutes';
BEGIN
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            EXECUTE p_sql;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() > v_deadline THEN
                RAISE;
            END IF;
        END;
        PERFORM pg_sleep(0.1 + random() * 0.2);
    END LOOP;
END $$;
-- +goose StatementEnd
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_amounts_check, ADD CONSTRAINT payments_amounts_check
    CHECK (unit_amount >= 0 AND amount >= 0 AND amount_refunded >= 0 AND (amount_received IS NULL OR amount_received >= 0)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_checkout_totals_check, ADD CONSTRAINT payments_checkout_totals_check
    CHECK ((checkout_currency IS NULL) = (checkout_amount_subtotal IS NULL) AND (checkout_currency IS NULL) = (checkout_amount_total IS NULL)
        AND (checkout_source_currency IS NULL) = (checkout_source_amount_subtotal IS NULL)
        AND (checkout_amount_subtotal IS NULL OR checkout_amount_subtotal >= 0)
        AND (checkout_amount_total IS NULL OR checkout_amount_total >= 0)
        AND (checkout_amount_tax IS NULL OR checkout_amount_tax >= 0)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_confirm_on_check, ADD CONSTRAINT payments_confirm_on_check
    CHECK (confirm_on IS NULL OR confirm_on IN ('payment_intent', 'checkout_session')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_confirmed_by_check, ADD CONSTRAINT payments_confirmed_by_check
    CHECK (confirmed_by IS NULL OR confirmed_by IN ('payment_intent', 'checkout_session', 'invoice', 'sync')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_credits_expiry_check, ADD CONSTRAINT payments_credits_expiry_check
    CHECK ((credits_expire_after_months IS NULL OR credits_expire_after_months > 0)
        AND (credits_expire_after_seconds IS NULL OR credits_expire_after_seconds > 0)
        AND (credits_expire_after_months IS NULL OR credits_expire_after_seconds IS NULL)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_item_kind_check, ADD CONSTRAINT payments_item_kind_check
    CHECK (item_kind IN ('credit_pack', 'product', 'plan')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_method_check, ADD CONSTRAINT payments_method_check
    CHECK (method IN ('checkout', 'invoice', 'auto_top_up')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_status_before_dispute_check, ADD CONSTRAINT payments_status_before_dispute_check
    CHECK (status_before_dispute IS NULL OR status_before_dispute IN ('succeeded', 'refunded')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payments DROP CONSTRAINT payments_status_check, ADD CONSTRAINT payments_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded', 'disputed', 'dispute_lost')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_status_check, ADD CONSTRAINT stripe_events_status_check
    CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'parked', 'dismissed')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_source_check, ADD CONSTRAINT stripe_events_source_check
    CHECK (source IN ('webhook', 'sync')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE payment_transitions DROP CONSTRAINT payment_transitions_source_check, ADD CONSTRAINT payment_transitions_source_check
    CHECK (source IS NULL OR source IN ('api', 'webhook', 'sync', 'operator')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_category, ADD CONSTRAINT credit_grants_category
    CHECK (category IN ('paid', 'promotional')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_source, ADD CONSTRAINT credit_grants_source
    CHECK (source IN ('purchase', 'service', 'dispute_won')) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_purchase_payment, ADD CONSTRAINT credit_grants_purchase_payment
    CHECK ((source IN ('purchase', 'dispute_won')) = (payment_id IS NOT NULL)) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_grants DROP CONSTRAINT credit_grants_effective_before_expiry, ADD CONSTRAINT credit_grants_effective_before_expiry
    CHECK (effective_at IS NULL OR expires_at IS NULL OR effective_at < expires_at) NOT VALID$ddl$);
SELECT tally_ddl_with_lock_retry($ddl$ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind, ADD CONSTRAINT credit_ledger_kind
    CHECK (kind IN ('grant', 'consume', 'expire', 'revoke', 'adjust', 'void')) NOT VALID$ddl$);

ALTER TABLE payments VALIDATE CONSTRAINT payments_amounts_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_checkout_totals_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_confirm_on_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_confirmed_by_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_credits_expiry_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_item_kind_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_method_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_status_before_dispute_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_status_check;
ALTER TABLE stripe_events VALIDATE CONSTRAINT stripe_events_status_check;
ALTER TABLE stripe_events VALIDATE CONSTRAINT stripe_events_source_check;
ALTER TABLE payment_transitions VALIDATE CONSTRAINT payment_transitions_source_check;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_category;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_source;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_purchase_payment;
ALTER TABLE credit_grants VALIDATE CONSTRAINT credit_grants_effective_before_expiry;
ALTER TABLE credit_ledger VALIDATE CONSTRAINT credit_ledger_kind;

DROP FUNCTION tally_ddl_with_lock_retry(text);
