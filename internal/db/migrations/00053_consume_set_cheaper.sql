-- A consume batch's fixed cost (issue 11). Measured with pgbench, one
-- client calling credits_consume_batch directly against a tally-bench
-- database (1,000 customers; 2-core machine shared with other work;
-- backend CPU per call, runs vary by 5-8%): about 1.16 ms for a batch of
-- one, 1.65 ms of four, 2.26 ms of eight. Most of it is the same for any
-- size (about 0.14 ms a consume more), so at the 4.4 consumes a batch of
-- consume-many it is most of a consume's cost. Two things here:
--
-- * credits_consume_set's generic plans scanned whole tables. The
--   statements take arrays whose size the planner cannot know (it guesses
--   ten rows), so where a table is small (a fresh or test database, the
--   bench's thousand customers) it hashed the batch and read customers
--   (to join each balance's thresholds) and credit_balances (in the
--   balance UPDATE) from end to end, at every call, for a batch of a few
--   rows; the plan is made once per session and kept (force_generic_plan)
--   however the tables grow. enable_seqscan = off leaves it the index
--   probes by key it uses on a large database: 0.97, 1.45 and 2.11 ms for
--   batches of one, four and eight against 1.29, 1.79 and 2.24 ms in the
--   run after it with whole-table scans.
--   Its fourteen array_agg(... ORDER BY ok.pos) sorted the rows fourteen
--   times (PostgreSQL 15 sorts per ordered aggregate); the order did not
--   matter: the arrays are parallel because one aggregate node feeds each
--   row to all of them in turn, and the ledger insert orders by position
--   itself. (Within the runs' noise at one client.)
--
-- * The foreign keys of credit_ledger and credit_consumption_daily to
--   customers go, as usage_events' did (migration 00043): each inserted
--   row locked its customer row FOR KEY SHARE (a WAL record and a dirtied
--   customers page, a MultiXact when two transactions name the customer)
--   to check what is already certain (at one client, as above, the
--   saving was within the runs' noise; the locks cost most where batches
--   run side by side). Every writer of either table
--   (consume, grant, expire, revoke, adjust, capture: the set, the batch
--   loop and the Go paths) writes under the customer's credit_balances
--   row lock (SELECT ... FOR UPDATE, or the UPDATE of that row), and
--   credit_balances keeps its foreign key: the customer exists when the
--   balance row is locked, and cannot be deleted while it is (the
--   delete's check of credit_balances waits for the lock, then finds the
--   row and refuses). A customer with a balance row is never deleted at
--   all; the trigger below refuses, besides, the delete of a customer
--   with ledger or rollup rows (tested in
--   internal/credits/keep_customers_test.go).

-- +goose Up
ALTER TABLE credit_ledger DROP CONSTRAINT IF EXISTS credit_ledger_customer_id_fkey;
ALTER TABLE credit_consumption_daily DROP CONSTRAINT IF EXISTS credit_consumption_daily_customer_id_fkey;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION customers_keep_credits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM credit_ledger WHERE customer_id = OLD.id) THEN
        RAISE EXCEPTION 'customer % has credit ledger entries and cannot be deleted', OLD.id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'credit_ledger_customer_id_fkey';
    END IF;
    IF EXISTS (SELECT 1 FROM credit_consumption_daily WHERE customer_id = OLD.id) THEN
        RAISE EXCEPTION 'customer % has consumption records and cannot be deleted', OLD.id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'credit_consumption_daily_customer_id_fkey';
    END IF;
    RETURN OLD;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER customers_keep_credits BEFORE DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION customers_keep_credits();

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_set(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    p_lease double precision)
RETURNS TABLE (pos int, result text, balance bigint)
LANGUAGE plpgsql
-- Plain index scans: see the first grant below. Generic plans: the
-- statements below take arrays and a batch's JSON, whose sizes the
-- planner cannot know anyway, and planning the first statement again at
-- each call (a custom plan) cost more than the rest of a one-consume
-- batch (0.62 against 0.44 ms of backend CPU for one consume, 0.19 against
-- 0.15 a consume in batches of 8); the generic plans probe each table by
-- its key as the custom ones do.
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
-- Index probes by key, never a whole table (migration 00053): with the
-- batch guessed at ten rows, a small table looked cheaper read whole.
SET enable_seqscan = off
-- See credits_consume_batch (migration 00052): a lock it would wait for
-- longer ends it, and the batch's block rolls back what it did.
SET lock_timeout = '50ms'
AS $$
DECLARE
    e_pos int[]; e_customer text[]; e_scope text[]; e_key text[]; e_hash bytea[]; e_amount bigint[]; e_id text[];
    e_reason text[]; e_meta jsonb[]; e_gid text[]; e_after bigint[]; e_notified boolean[]; e_now timestamptz[];
    e_answer text[]; c_ord bigint[]; n bigint; l_pos int[]; l_items jsonb[];
BEGIN
    -- The candidates, and the money locks, in one order, in a statement
    -- of their own: the statement after it reads the grants in a snapshot
    -- taken once the locks are held, so it sees whatever a writer of these
    -- customers' grants (each takes the balance lock first) committed
    -- before (in one statement, a grant committed between its snapshot and
    -- its lock would be missed). A row another transaction holds is
    -- skipped: its item goes one by one, where it defers.
    WITH it AS (
        SELECT (x.ord - 1)::int AS pos, x.v, x.v->>'customer' AS customer, x.v->>'kind' AS kind,
               count(*) OVER (PARTITION BY x.v->>'customer') AS n_customer,
               count(*) OVER (PARTITION BY x.v->>'scope', x.v->>'key') AS n_key
        FROM jsonb_array_elements(items) WITH ORDINALITY AS x(v, ord)
    ), cand AS MATERIALIZED (
        SELECT it.pos, it.v, it.customer FROM it WHERE it.kind = 'consume' AND it.n_customer = 1 AND it.n_key = 1
    )
    SELECT array_agg(cand.pos), array_agg(cand.v) INTO l_pos, l_items
    FROM cand JOIN (
        SELECT b.customer_id FROM credit_balances b
        WHERE b.customer_id IN (SELECT cand.customer FROM cand)
        ORDER BY b.customer_id
        FOR UPDATE OF b SKIP LOCKED) l ON l.customer_id = cand.customer;
    IF l_pos IS NULL THEN
        RETURN;
    END IF;

    WITH cand AS (
        SELECT p.pos, p.v, p.v->>'customer' AS customer, (p.v->>'amount')::bigint AS amount
        FROM unnest(l_pos, l_items) AS p(pos, v)
    ), lk AS MATERIALIZED (
        SELECT b.customer_id, b.balance, b.held, b.next_expiry, b.next_hold_expiry, b.low_balance_notified,
               COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold) AS threshold,
               c.low_balance_thresholds, greatest(p_now, b.updated_at) AS now
        FROM credit_balances b JOIN customers c ON c.id = b.customer_id
        WHERE b.customer_id IN (SELECT cand.customer FROM cand)
    ), ev AS (
        SELECT cand.pos, cand.v, cand.customer, cand.amount, lk.balance, lk.low_balance_notified, lk.threshold,
               lk.low_balance_thresholds, lk.now, lk.balance - lk.held - pend.pending AS spendable,
               tu.below AS top_up_below,
               g.id AS gid, g.free
        FROM cand JOIN lk ON lk.customer_id = cand.customer
        -- credits_pending, written out: a SQL function called per row is
        -- planned again at each call.
        CROSS JOIN LATERAL (
            SELECT COALESCE(sum(g.remaining), 0)::bigint AS pending FROM credit_grants g
            WHERE g.customer_id = cand.customer AND g.effective_at IS NOT NULL AND g.remaining > 0 AND g.effective_at > lk.now) pend
        -- credits_top_up_below, written out likewise (nothing runs when
        -- no top-up may start).
        CROSS JOIN LATERAL (
            SELECT COALESCE((SELECT t.threshold FROM auto_top_up_settings t
                             JOIN customer_payment_methods m ON m.customer_id = t.customer_id
                             WHERE p_top_up AND t.customer_id = cand.customer AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
                               AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > (lk.now AT TIME ZONE 'UTC')
                               AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
                                    OR t.month_start IS DISTINCT FROM date_trunc('month', lk.now AT TIME ZONE 'UTC')::date)), 0) AS below) tu
        -- The first grant in draw order. The expiry test is written so that
        -- it is no index condition: the draw-order index then serves the
        -- ORDER BY ... LIMIT 1 as a plain index scan, which stops at the
        -- first live row (and marks the dead ones it passes), where a
        -- bitmap scan would read every version the customer's grant left.
        CROSS JOIN LATERAL (
            SELECT g.id, g.remaining - g.held AS free
            FROM credit_grants g
            WHERE g.customer_id = cand.customer AND g.remaining > 0 AND g.remaining > g.held
              AND COALESCE(g.expires_at, 'infinity') > lk.now AND COALESCE(g.effective_at, '-infinity') <= lk.now
            ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
            LIMIT 1) g
        -- Holds or grants due to expire first: the full path writes those.
        WHERE NOT COALESCE(lk.next_hold_expiry <= lk.now, false) AND NOT COALESCE(lk.next_expiry <= lk.now, false)
    ), ok AS (
        SELECT ev.*, ev.threshold > 0 AND ev.spendable - ev.amount < ev.threshold AS below
        FROM ev
        WHERE ev.spendable >= ev.amount AND ev.free >= ev.amount
    )
    -- Parallel arrays: one aggregate node takes each row into all of them
    -- in turn (an ORDER BY in each sorted the rows once per array).
    SELECT array_agg(ok.pos), array_agg(ok.customer),
           array_agg(ok.v->>'scope'), array_agg(ok.v->>'key'),
           array_agg(decode(ok.v->>'hash', 'hex')), array_agg(ok.amount),
           array_agg(ok.v->>'id'), array_agg(ok.v->>'reason'),
           array_agg(COALESCE(ok.v->'metadata', '{}'::jsonb)), array_agg(ok.gid),
           array_agg(ok.balance - ok.amount), array_agg(ok.below AND ok.low_balance_notified),
           array_agg(ok.now),
           array_agg(jsonb_build_object('transaction_id', ok.v->>'id', 'amount', ok.amount, 'balance', ok.balance - ok.amount)::text)
    INTO e_pos, e_customer, e_scope, e_key, e_hash, e_amount, e_id, e_reason, e_meta, e_gid, e_after, e_notified, e_now, e_answer
    FROM ok
    -- A notice to fire or a top-up to start: the full path's afterLowering.
    WHERE NOT (ok.below AND NOT ok.low_balance_notified)
      AND NOT EXISTS (SELECT 1 FROM unnest(ok.low_balance_thresholds) t
                      WHERE t <> ok.threshold AND ok.spendable >= t AND ok.spendable - ok.amount < t)
      AND NOT (ok.top_up_below > 0 AND ok.spendable - ok.amount < ok.top_up_below);
    IF e_pos IS NULL THEN
        -- Nothing applied: the items it locked, as such.
        RETURN QUERY SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos);
        RETURN;
    END IF;

    -- The keys, complete with their answers; those already there drop out.
    WITH ins AS (
        INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at, result, completed_at)
        SELECT t.scope, t.key, t.hash, now() + make_interval(secs => p_lease), convert_to(t.answer, 'UTF8'), now()
        FROM unnest(e_scope, e_key, e_hash, e_answer) AS t(scope, key, hash, answer)
        ON CONFLICT DO NOTHING
        RETURNING k.scope, k.key)
    SELECT array_agg(t.ord) INTO c_ord
    FROM ins JOIN unnest(e_scope, e_key) WITH ORDINALITY AS t(scope, key, ord) ON t.scope = ins.scope AND t.key = ins.key;
    IF c_ord IS NULL THEN
        -- Nothing applied: the items it locked, as such.
        RETURN QUERY SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos);
        RETURN;
    END IF;

    UPDATE credit_grants g SET remaining = g.remaining - t.amount
    FROM unnest(e_gid, e_amount) WITH ORDINALITY AS t(gid, amount, ord)
    WHERE g.id = t.gid AND t.ord = ANY (c_ord);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> cardinality(c_ord) THEN
        -- Fails the whole batch; the Go side then runs each on its own.
        RAISE EXCEPTION 'credits: consume set drew from % grants for % consumes', n, cardinality(c_ord);
    END IF;
    UPDATE credit_balances b
    SET balance = b.balance - t.amount, low_balance_notified = t.notified,
        default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
        updated_at = t.now
    FROM unnest(e_customer, e_amount, e_notified, e_now, e_after) WITH ORDINALITY AS t(customer, amount, notified, now, after, ord)
    WHERE b.customer_id = t.customer AND t.ord = ANY (c_ord) AND b.balance - t.amount = t.after;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> cardinality(c_ord) THEN
        RAISE EXCEPTION 'credits: consume set lowered % balances for % consumes: balance rows moved under their locks', n, cardinality(c_ord);
    END IF;
    INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
    SELECT t.customer, (t.now AT TIME ZONE 'UTC')::date, t.amount
    FROM unnest(e_customer, e_amount, e_now) WITH ORDINALITY AS t(customer, amount, now, ord)
    WHERE t.ord = ANY (c_ord)
    ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed;
    INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
    SELECT t.id, t.customer, 'consume', -t.amount, t.after, t.reason, t.meta,
           jsonb_build_array(jsonb_build_object('grant_id', t.gid, 'amount', t.amount)), t.key, t.now
    FROM unnest(e_id, e_customer, e_amount, e_after, e_reason, e_meta, e_gid, e_key, e_now) WITH ORDINALITY
         AS t(id, customer, amount, after, reason, meta, gid, key, now, ord)
    WHERE t.ord = ANY (c_ord)
    ORDER BY t.ord;
    RETURN QUERY
    SELECT t.pos, t.answer, t.after
    FROM unnest(e_pos, e_answer, e_after) WITH ORDINALITY AS t(pos, answer, after, ord)
    WHERE t.ord = ANY (c_ord);
    -- And the items it locked but left to the loop (result NULL).
    RETURN QUERY
    SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos)
    WHERE p.pos <> ALL (SELECT t.pos FROM unnest(e_pos) WITH ORDINALITY AS t(pos, ord) WHERE t.ord = ANY (c_ord));
END;
$$;
-- +goose StatementEnd

-- +goose Down
DROP TRIGGER IF EXISTS customers_keep_credits ON customers;
DROP FUNCTION IF EXISTS customers_keep_credits();
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_customer_id_fkey
    FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE credit_ledger VALIDATE CONSTRAINT credit_ledger_customer_id_fkey;
ALTER TABLE credit_consumption_daily ADD CONSTRAINT credit_consumption_daily_customer_id_fkey
    FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE credit_consumption_daily VALIDATE CONSTRAINT credit_consumption_daily_customer_id_fkey;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_set(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    p_lease double precision)
RETURNS TABLE (pos int, result text, balance bigint)
LANGUAGE plpgsql
-- Plain index scans: see the first grant below. Generic plans: the
-- statements below take arrays and a batch's JSON, whose sizes the
-- planner cannot know anyway, and planning the first statement again at
-- each call (a custom plan) cost more than the rest of a one-consume
-- batch (0.62 against 0.44 ms of backend CPU for one consume, 0.19 against
-- 0.15 a consume in batches of 8); the generic plans probe each table by
-- its key as the custom ones do.
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
-- See credits_consume_batch (migration 00052): a lock it would wait for
-- longer ends it, and the batch's block rolls back what it did.
SET lock_timeout = '50ms'
AS $$
DECLARE
    e_pos int[]; e_customer text[]; e_scope text[]; e_key text[]; e_hash bytea[]; e_amount bigint[]; e_id text[];
    e_reason text[]; e_meta jsonb[]; e_gid text[]; e_after bigint[]; e_notified boolean[]; e_now timestamptz[];
    e_answer text[]; c_ord bigint[]; n bigint; l_pos int[]; l_items jsonb[];
BEGIN
    -- The candidates, and the money locks, in one order, in a statement
    -- of their own: the statement after it reads the grants in a snapshot
    -- taken once the locks are held, so it sees whatever a writer of these
    -- customers' grants (each takes the balance lock first) committed
    -- before (in one statement, a grant committed between its snapshot and
    -- its lock would be missed). A row another transaction holds is
    -- skipped: its item goes one by one, where it defers.
    WITH it AS (
        SELECT (x.ord - 1)::int AS pos, x.v, x.v->>'customer' AS customer, x.v->>'kind' AS kind,
               count(*) OVER (PARTITION BY x.v->>'customer') AS n_customer,
               count(*) OVER (PARTITION BY x.v->>'scope', x.v->>'key') AS n_key
        FROM jsonb_array_elements(items) WITH ORDINALITY AS x(v, ord)
    ), cand AS MATERIALIZED (
        SELECT it.pos, it.v, it.customer FROM it WHERE it.kind = 'consume' AND it.n_customer = 1 AND it.n_key = 1
    )
    SELECT array_agg(cand.pos), array_agg(cand.v) INTO l_pos, l_items
    FROM cand JOIN (
        SELECT b.customer_id FROM credit_balances b
        WHERE b.customer_id IN (SELECT cand.customer FROM cand)
        ORDER BY b.customer_id
        FOR UPDATE OF b SKIP LOCKED) l ON l.customer_id = cand.customer;
    IF l_pos IS NULL THEN
        RETURN;
    END IF;

    WITH cand AS (
        SELECT p.pos, p.v, p.v->>'customer' AS customer, (p.v->>'amount')::bigint AS amount
        FROM unnest(l_pos, l_items) AS p(pos, v)
    ), lk AS MATERIALIZED (
        SELECT b.customer_id, b.balance, b.held, b.next_expiry, b.next_hold_expiry, b.low_balance_notified,
               COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold) AS threshold,
               c.low_balance_thresholds, greatest(p_now, b.updated_at) AS now
        FROM credit_balances b JOIN customers c ON c.id = b.customer_id
        WHERE b.customer_id IN (SELECT cand.customer FROM cand)
    ), ev AS (
        SELECT cand.pos, cand.v, cand.customer, cand.amount, lk.balance, lk.low_balance_notified, lk.threshold,
               lk.low_balance_thresholds, lk.now, lk.balance - lk.held - pend.pending AS spendable,
               tu.below AS top_up_below,
               g.id AS gid, g.free
        FROM cand JOIN lk ON lk.customer_id = cand.customer
        -- credits_pending, written out: a SQL function called per row is
        -- planned again at each call.
        CROSS JOIN LATERAL (
            SELECT COALESCE(sum(g.remaining), 0)::bigint AS pending FROM credit_grants g
            WHERE g.customer_id = cand.customer AND g.effective_at IS NOT NULL AND g.remaining > 0 AND g.effective_at > lk.now) pend
        -- credits_top_up_below, written out likewise (nothing runs when
        -- no top-up may start).
        CROSS JOIN LATERAL (
            SELECT COALESCE((SELECT t.threshold FROM auto_top_up_settings t
                             JOIN customer_payment_methods m ON m.customer_id = t.customer_id
                             WHERE p_top_up AND t.customer_id = cand.customer AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
                               AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > (lk.now AT TIME ZONE 'UTC')
                               AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
                                    OR t.month_start IS DISTINCT FROM date_trunc('month', lk.now AT TIME ZONE 'UTC')::date)), 0) AS below) tu
        -- The first grant in draw order. The expiry test is written so that
        -- it is no index condition: the draw-order index then serves the
        -- ORDER BY ... LIMIT 1 as a plain index scan, which stops at the
        -- first live row (and marks the dead ones it passes), where a
        -- bitmap scan would read every version the customer's grant left.
        CROSS JOIN LATERAL (
            SELECT g.id, g.remaining - g.held AS free
            FROM credit_grants g
            WHERE g.customer_id = cand.customer AND g.remaining > 0 AND g.remaining > g.held
              AND COALESCE(g.expires_at, 'infinity') > lk.now AND COALESCE(g.effective_at, '-infinity') <= lk.now
            ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
            LIMIT 1) g
        -- Holds or grants due to expire first: the full path writes those.
        WHERE NOT COALESCE(lk.next_hold_expiry <= lk.now, false) AND NOT COALESCE(lk.next_expiry <= lk.now, false)
    ), ok AS (
        SELECT ev.*, ev.threshold > 0 AND ev.spendable - ev.amount < ev.threshold AS below
        FROM ev
        WHERE ev.spendable >= ev.amount AND ev.free >= ev.amount
    )
    SELECT array_agg(ok.pos ORDER BY ok.pos), array_agg(ok.customer ORDER BY ok.pos),
           array_agg(ok.v->>'scope' ORDER BY ok.pos), array_agg(ok.v->>'key' ORDER BY ok.pos),
           array_agg(decode(ok.v->>'hash', 'hex') ORDER BY ok.pos), array_agg(ok.amount ORDER BY ok.pos),
           array_agg(ok.v->>'id' ORDER BY ok.pos), array_agg(ok.v->>'reason' ORDER BY ok.pos),
           array_agg(COALESCE(ok.v->'metadata', '{}'::jsonb) ORDER BY ok.pos), array_agg(ok.gid ORDER BY ok.pos),
           array_agg(ok.balance - ok.amount ORDER BY ok.pos), array_agg(ok.below AND ok.low_balance_notified ORDER BY ok.pos),
           array_agg(ok.now ORDER BY ok.pos),
           array_agg(jsonb_build_object('transaction_id', ok.v->>'id', 'amount', ok.amount, 'balance', ok.balance - ok.amount)::text ORDER BY ok.pos)
    INTO e_pos, e_customer, e_scope, e_key, e_hash, e_amount, e_id, e_reason, e_meta, e_gid, e_after, e_notified, e_now, e_answer
    FROM ok
    -- A notice to fire or a top-up to start: the full path's afterLowering.
    WHERE NOT (ok.below AND NOT ok.low_balance_notified)
      AND NOT EXISTS (SELECT 1 FROM unnest(ok.low_balance_thresholds) t
                      WHERE t <> ok.threshold AND ok.spendable >= t AND ok.spendable - ok.amount < t)
      AND NOT (ok.top_up_below > 0 AND ok.spendable - ok.amount < ok.top_up_below);
    IF e_pos IS NULL THEN
        -- Nothing applied: the items it locked, as such.
        RETURN QUERY SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos);
        RETURN;
    END IF;

    -- The keys, complete with their answers; those already there drop out.
    WITH ins AS (
        INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at, result, completed_at)
        SELECT t.scope, t.key, t.hash, now() + make_interval(secs => p_lease), convert_to(t.answer, 'UTF8'), now()
        FROM unnest(e_scope, e_key, e_hash, e_answer) AS t(scope, key, hash, answer)
        ON CONFLICT DO NOTHING
        RETURNING k.scope, k.key)
    SELECT array_agg(t.ord) INTO c_ord
    FROM ins JOIN unnest(e_scope, e_key) WITH ORDINALITY AS t(scope, key, ord) ON t.scope = ins.scope AND t.key = ins.key;
    IF c_ord IS NULL THEN
        -- Nothing applied: the items it locked, as such.
        RETURN QUERY SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos);
        RETURN;
    END IF;

    UPDATE credit_grants g SET remaining = g.remaining - t.amount
    FROM unnest(e_gid, e_amount) WITH ORDINALITY AS t(gid, amount, ord)
    WHERE g.id = t.gid AND t.ord = ANY (c_ord);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> cardinality(c_ord) THEN
        -- Fails the whole batch; the Go side then runs each on its own.
        RAISE EXCEPTION 'credits: consume set drew from % grants for % consumes', n, cardinality(c_ord);
    END IF;
    UPDATE credit_balances b
    SET balance = b.balance - t.amount, low_balance_notified = t.notified,
        default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
        updated_at = t.now
    FROM unnest(e_customer, e_amount, e_notified, e_now, e_after) WITH ORDINALITY AS t(customer, amount, notified, now, after, ord)
    WHERE b.customer_id = t.customer AND t.ord = ANY (c_ord) AND b.balance - t.amount = t.after;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> cardinality(c_ord) THEN
        RAISE EXCEPTION 'credits: consume set lowered % balances for % consumes: balance rows moved under their locks', n, cardinality(c_ord);
    END IF;
    INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
    SELECT t.customer, (t.now AT TIME ZONE 'UTC')::date, t.amount
    FROM unnest(e_customer, e_amount, e_now) WITH ORDINALITY AS t(customer, amount, now, ord)
    WHERE t.ord = ANY (c_ord)
    ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed;
    INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
    SELECT t.id, t.customer, 'consume', -t.amount, t.after, t.reason, t.meta,
           jsonb_build_array(jsonb_build_object('grant_id', t.gid, 'amount', t.amount)), t.key, t.now
    FROM unnest(e_id, e_customer, e_amount, e_after, e_reason, e_meta, e_gid, e_key, e_now) WITH ORDINALITY
         AS t(id, customer, amount, after, reason, meta, gid, key, now, ord)
    WHERE t.ord = ANY (c_ord)
    ORDER BY t.ord;
    RETURN QUERY
    SELECT t.pos, t.answer, t.after
    FROM unnest(e_pos, e_answer, e_after) WITH ORDINALITY AS t(pos, answer, after, ord)
    WHERE t.ord = ANY (c_ord);
    -- And the items it locked but left to the loop (result NULL).
    RETURN QUERY
    SELECT p.pos, NULL::text, NULL::bigint FROM unnest(l_pos) AS p(pos)
    WHERE p.pos <> ALL (SELECT t.pos FROM unnest(e_pos) WITH ORDINALITY AS t(pos, ord) WHERE t.ord = ANY (c_ord));
END;
$$;
-- +goose StatementEnd
