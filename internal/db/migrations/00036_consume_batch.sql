-- Group commit for consumes (internal/credits/batch.go): one call of
-- credits_consume_batch applies a batch of consumes gathered from
-- concurrent requests, in order, each with its own idempotency record and
-- its own answer, in the one implicit transaction of the statement that
-- calls it. It is the whole of a consume in one round trip: the key's
-- claim (or the replay of its stored answer), the balance row's lock, the
-- expiry and hold-expiry checks, the draws in draw order (priority, then
-- soonest expiry, then oldest) from what holds do not keep, the balance,
-- the day's consumption rollup, the ledger entry and the stored answer.
--
-- A consume that is refused (insufficient credits, unknown customer, a key
-- reused with another request, a key in flight) writes nothing and does
-- not stop its neighbours. A consume that needs more than a draw (grants or
-- holds due to expire first, a low-balance notice to fire, an automatic
-- top-up to start, a key to take over) is answered 'defer' having written
-- nothing, and so is every later consume of the same customer in the
-- batch: the Go side then runs them, in order, through the full path
-- (credits.consume inside db.Once), which does all of that.
--
-- A hold's capture is a consume too (it spends with a consume entry), and
-- a new hold draws as a consume does: both are applied by the same call,
-- credits_capture_one and credits_hold_one beside credits_consume_one,
-- with the same claim before and the same answers.
--
-- items: [{"kind" (consume, capture, hold),"customer","scope","key","hash"
-- (hex),"id" (the ledger entry's id), and for a consume "amount","reason",
-- "metadata" (object); for a capture "hold","amount" (null: all); for a
-- hold "hold" (its new id),"amount","reason","metadata","expires_in"
-- (seconds)}].
-- Answers, one row per item in input order: status ok (result is the
-- stored answer), replay (result is the stored answer of the key's first
-- request), reused, inflight, insufficient (balance, available), notfound
-- (the customer), defer; for a capture also hold_notfound, hold_ended
-- (result: the hold's status), too_much (balance: what the hold has).

-- +goose Up
-- +goose StatementBegin
-- What lockAccount reads beside the lock, for the functions below: the
-- credits not effective yet, what may be spent or held now (account.go's
-- available), and the automatic top-up threshold when a top-up may start
-- now (0 when none may).
CREATE FUNCTION credits_pending(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(g.remaining), 0)::bigint FROM credit_grants g
    WHERE g.customer_id = p_customer AND g.effective_at IS NOT NULL AND g.remaining > 0 AND g.effective_at > p_now
$$;
CREATE FUNCTION credits_available(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(g.remaining - g.held), 0)::bigint FROM credit_grants g
    WHERE g.customer_id = p_customer AND g.remaining > 0 AND g.remaining > g.held
      AND (g.expires_at IS NULL OR g.expires_at > p_now) AND (g.effective_at IS NULL OR g.effective_at <= p_now)
$$;
CREATE FUNCTION credits_top_up_below(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT t.threshold FROM auto_top_up_settings t
                     JOIN customer_payment_methods m ON m.customer_id = t.customer_id
                     WHERE t.customer_id = p_customer AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
                       AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > (p_now AT TIME ZONE 'UTC')
                       AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
                            OR t.month_start IS DISTINCT FROM date_trunc('month', p_now AT TIME ZONE 'UTC')::date)), 0)
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION credits_consume_one(it jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    OUT status text, OUT result text, OUT balance bigint, OUT available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_customer text := it->>'customer'; v_scope text := it->>'scope'; v_key text := it->>'key';
    v_amount bigint := (it->>'amount')::bigint; v_id text := it->>'id';
    b_balance bigint; b_next_expiry timestamptz; b_held bigint; b_next_hold_expiry timestamptz;
    b_notified boolean; b_threshold bigint; b_updated_at timestamptz; b_thresholds bigint[];
    b_pending bigint; b_top_up_below bigint;
    v_now timestamptz; v_spendable bigint; v_after bigint; v_below boolean;
    v_bal_after bigint; v_drawn bigint; v_grants bigint; v_answer text; v_gid text; v_free bigint;
BEGIN
    -- The money lock, and what lockAccount reads with it.
    SELECT b.balance, b.next_expiry, b.held, b.next_hold_expiry, b.low_balance_notified,
           COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold), b.updated_at,
           c.low_balance_thresholds
    INTO b_balance, b_next_expiry, b_held, b_next_hold_expiry, b_notified, b_threshold, b_updated_at, b_thresholds
    FROM credit_balances b JOIN customers c ON c.id = b.customer_id
    WHERE b.customer_id = v_customer
    FOR UPDATE OF b SKIP LOCKED;
    IF NOT FOUND AND EXISTS (SELECT 1 FROM credit_balances b WHERE b.customer_id = v_customer) THEN
        -- Another transaction (a grant, a hold, the sweeper) has the
        -- row. The full path waits for it and reads the clock once it
        -- holds the lock, so that expiry is decided at the time the
        -- consume happens (a batch's clock was read before it began).
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    IF NOT FOUND THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        IF EXISTS (SELECT 1 FROM customers c WHERE c.id = v_customer) THEN
            status := 'insufficient'; balance := 0; available := 0;
        ELSE
            status := 'notfound';
        END IF;
        RETURN;
    END IF;
    -- The batch's time: the clock read as it began (no lock was waited
    -- for: see SKIP LOCKED above), never before the row's last change.
    v_now := greatest(p_now, b_updated_at);
    IF b_next_hold_expiry <= v_now OR b_next_expiry <= v_now THEN
        -- Holds or grants to expire first: the full path writes those.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    b_pending := credits_pending(v_customer, v_now);
    v_spendable := b_balance - b_held - b_pending;
    IF v_spendable < v_amount THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'insufficient'; balance := b_balance;
        available := credits_available(v_customer, v_now);
        RETURN;
    END IF;
    v_after := v_spendable - v_amount;
    v_below := b_threshold > 0 AND v_after < b_threshold;
    b_top_up_below := 0;
    IF p_top_up THEN
        b_top_up_below := credits_top_up_below(v_customer, v_now);
    END IF;
    IF (v_below AND NOT b_notified)
       OR EXISTS (SELECT 1 FROM unnest(b_thresholds) t WHERE t <> b_threshold AND v_spendable >= t AND v_after < t)
       OR (b_top_up_below > 0 AND v_after < b_top_up_below) THEN
        -- A notice to fire or a top-up to start: the full path's
        -- afterLowering does it in the consume's transaction.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;

    -- The common case costs least: the first grant in draw order covers
    -- the amount, so the draw is one row.
    SELECT g.id, g.remaining - g.held INTO v_gid, v_free
    FROM credit_grants g
    WHERE g.customer_id = v_customer AND g.remaining > 0 AND g.remaining > g.held
      AND (g.expires_at IS NULL OR g.expires_at > v_now) AND (g.effective_at IS NULL OR g.effective_at <= v_now)
    ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id
    LIMIT 1;
    IF v_free >= v_amount THEN
        UPDATE credit_grants g SET remaining = g.remaining - v_amount WHERE g.id = v_gid;
        UPDATE credit_balances b
        SET balance = b.balance - v_amount, low_balance_notified = (v_below AND b_notified),
            default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
            updated_at = v_now
        WHERE b.customer_id = v_customer
        RETURNING b.balance INTO v_bal_after;
        INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
        VALUES (v_customer, (v_now AT TIME ZONE 'UTC')::date, v_amount)
        ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed;
        INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
        VALUES (v_id, v_customer, 'consume', -v_amount, v_bal_after, it->>'reason', COALESCE(it->'metadata', '{}'::jsonb),
                jsonb_build_array(jsonb_build_object('grant_id', v_gid, 'amount', v_amount)), v_key, v_now);
        v_drawn := v_amount; v_grants := 1;
    ELSE
        -- The draws, the balance, the rollup and the ledger entry, as
        -- credits.consumeSQL writes them.
        WITH cand AS (
            SELECT g.id, g.remaining - g.held AS free,
                   (sum(g.remaining - g.held) OVER w)::bigint AS run,
                   row_number() OVER w AS rn
            FROM credit_grants g
            WHERE g.customer_id = v_customer AND g.remaining > 0 AND g.remaining > g.held
              AND (g.expires_at IS NULL OR g.expires_at > v_now) AND (g.effective_at IS NULL OR g.effective_at <= v_now)
            WINDOW w AS (ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id)
        ), draws AS (
            SELECT cand.id, cand.rn, LEAST(cand.free, v_amount - (cand.run - cand.free)) AS take
            FROM cand WHERE cand.run - cand.free < v_amount AND (SELECT max(run) FROM cand) >= v_amount
        ), drawn AS (
            UPDATE credit_grants g SET remaining = g.remaining - d.take
            FROM draws d WHERE g.id = d.id
            RETURNING g.id
        ), bal AS (
            UPDATE credit_balances b
            SET balance = b.balance - v_amount, low_balance_notified = (v_below AND b_notified),
                default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
                updated_at = v_now
            WHERE b.customer_id = v_customer AND EXISTS (SELECT 1 FROM draws)
            RETURNING b.balance
        ), rollup AS (
            INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
            SELECT v_customer, (v_now AT TIME ZONE 'UTC')::date, v_amount
            WHERE EXISTS (SELECT 1 FROM draws)
            ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed
        )
        INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
        SELECT v_id, v_customer, 'consume', -v_amount, bal.balance, it->>'reason', COALESCE(it->'metadata', '{}'::jsonb),
               (SELECT jsonb_agg(jsonb_build_object('grant_id', d.id, 'amount', d.take) ORDER BY d.rn) FROM draws d),
               v_key, v_now
        FROM bal
        RETURNING balance_after, (SELECT COALESCE(sum(take), 0)::bigint FROM draws), (SELECT count(*) FROM drawn)
        INTO v_bal_after, v_drawn, v_grants;
        IF NOT FOUND THEN
            -- What holds do not keep covers it, but not all of it is
            -- effective yet or unexpired: nothing was written.
            DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
            status := 'insufficient'; balance := b_balance;
            available := credits_available(v_customer, v_now);
            RETURN;
        END IF;
    END IF;
    IF v_bal_after <> b_balance - v_amount OR v_drawn <> v_amount OR v_grants = 0 THEN
        -- Fails the whole batch; the Go side then runs each consume on
        -- its own, where this one fails alone.
        RAISE EXCEPTION 'credits: consume of % for % drew % from % grants, balance %, expected %: balance row and grants disagree',
            v_amount, v_customer, v_drawn, v_grants, v_bal_after, b_balance - v_amount;
    END IF;
    v_answer := jsonb_build_object('transaction_id', v_id, 'amount', v_amount, 'balance', v_bal_after)::text;
    UPDATE idempotency_keys k SET result = convert_to(v_answer, 'UTF8'), completed_at = now()
    WHERE k.scope = v_scope AND k.key = v_key;
    status := 'ok'; result := v_answer; balance := v_bal_after;
END;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION credits_capture_one(it jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    OUT status text, OUT result text, OUT balance bigint, OUT available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_customer text := it->>'customer'; v_scope text := it->>'scope'; v_key text := it->>'key';
    v_hold text := it->>'hold'; v_id text := it->>'id';
    b_balance bigint; b_next_expiry timestamptz; b_held bigint; b_next_hold_expiry timestamptz;
    b_notified boolean; b_threshold bigint; b_updated_at timestamptz; b_thresholds bigint[];
    b_pending bigint; b_top_up_below bigint;
    h credit_holds%ROWTYPE;
    v_now timestamptz; v_captured bigint; v_before bigint; v_after bigint; v_below boolean; v_fire boolean;
    v_parts jsonb; v_spent jsonb; v_next_expiry timestamptz; v_answer text; v_tx text;
BEGIN
    SELECT b.balance, b.next_expiry, b.held, b.next_hold_expiry, b.low_balance_notified,
           COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold), b.updated_at,
           c.low_balance_thresholds
    INTO b_balance, b_next_expiry, b_held, b_next_hold_expiry, b_notified, b_threshold, b_updated_at, b_thresholds
    FROM credit_balances b JOIN customers c ON c.id = b.customer_id
    WHERE b.customer_id = v_customer
    FOR UPDATE OF b SKIP LOCKED;
    IF NOT FOUND AND EXISTS (SELECT 1 FROM credit_balances b WHERE b.customer_id = v_customer) THEN
        -- Locked by another transaction: as for a consume.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    IF NOT FOUND THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        IF EXISTS (SELECT 1 FROM customers c WHERE c.id = v_customer) THEN
            status := 'hold_notfound';
        ELSE
            status := 'notfound';
        END IF;
        RETURN;
    END IF;
    v_now := greatest(p_now, b_updated_at);
    IF b_next_hold_expiry <= v_now OR b_next_expiry <= v_now THEN
        -- Holds or grants to expire first (an expired hold is never
        -- captured): the full path releases and expires them.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    SELECT * INTO h FROM credit_holds WHERE id = v_hold AND customer_id = v_customer FOR UPDATE;
    IF NOT FOUND THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'hold_notfound'; RETURN;
    END IF;
    IF h.status <> 'active' THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'hold_ended'; result := h.status; RETURN;
    END IF;
    IF h.claimed > 0 THEN
        -- A refund's shortfall claims what the hold gives back (migration
        -- 00035): the full path pays the claims.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    v_captured := COALESCE((it->>'amount')::bigint, h.amount);
    IF v_captured > h.amount THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'too_much'; balance := h.amount; RETURN;
    END IF;
    -- What the hold kept of each grant, and what the capture takes of it,
    -- spent from the hold's draws in their order.
    SELECT COALESCE(jsonb_agg(jsonb_build_object('grant_id', d.grant_id, 'held', d.amount,
                        'take', LEAST(d.amount, GREATEST(v_captured - (d.run - d.amount), 0))) ORDER BY d.ord), '[]'::jsonb)
    INTO v_parts
    FROM (SELECT x.d->>'grant_id' AS grant_id, (x.d->>'amount')::bigint AS amount, x.ord,
                 sum((x.d->>'amount')::bigint) OVER (ORDER BY x.ord) AS run
          FROM jsonb_array_elements(h.draws::jsonb) WITH ORDINALITY AS x(d, ord)) d;
    -- Credits that go back to a grant voided or expired meanwhile must be
    -- voided or expired: the full path does that.
    IF EXISTS (SELECT 1 FROM jsonb_to_recordset(v_parts) AS p(grant_id text, held bigint, take bigint)
               JOIN credit_grants g ON g.id = p.grant_id
               WHERE p.held > p.take AND (g.voided_at IS NOT NULL OR g.expires_at <= v_now)) THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    b_pending := credits_pending(v_customer, v_now);
    v_before := b_balance - b_held - b_pending;
    v_after := (b_balance - v_captured) - (b_held - h.amount) - b_pending;
    v_below := b_threshold > 0 AND v_after < b_threshold;
    v_fire := v_below AND NOT b_notified;
    b_top_up_below := 0;
    IF p_top_up THEN
        b_top_up_below := credits_top_up_below(v_customer, v_now);
    END IF;
    IF v_fire
       OR EXISTS (SELECT 1 FROM unnest(b_thresholds) t WHERE t <> b_threshold AND v_before >= t AND v_after < t)
       OR (b_top_up_below > 0 AND v_after < b_top_up_below) THEN
        -- A notice to fire or a top-up to start: the full path.
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;

    -- The hold ends: each grant's held falls by its part, its remaining
    -- by what is taken; an unexpired grant with credits back may lower the
    -- expiry bound.
    WITH back AS (
        UPDATE credit_grants g SET held = g.held - p.held, remaining = g.remaining - p.take
        FROM (SELECT grant_id, sum(held)::bigint AS held, sum(take)::bigint AS take
              FROM jsonb_to_recordset(v_parts) AS x(grant_id text, held bigint, take bigint) GROUP BY grant_id) p
        WHERE g.id = p.grant_id AND g.customer_id = v_customer
        RETURNING g.remaining, g.held, g.expires_at)
    SELECT min(back.expires_at) INTO v_next_expiry FROM back
    WHERE back.remaining > back.held AND back.expires_at IS NOT NULL;
    IF v_next_expiry IS NOT NULL AND (b_next_expiry IS NULL OR v_next_expiry < b_next_expiry) THEN
        b_next_expiry := v_next_expiry;
    END IF;
    b_held := b_held - h.amount;
    SELECT min(ch.expires_at) INTO b_next_hold_expiry FROM credit_holds ch
    WHERE ch.customer_id = v_customer AND ch.status = 'active' AND ch.id <> h.id;
    IF v_captured > 0 THEN
        b_balance := b_balance - v_captured;
        v_tx := v_id;
        SELECT jsonb_agg(jsonb_build_object('grant_id', p.d->>'grant_id', 'amount', (p.d->>'take')::bigint) ORDER BY p.ord) INTO v_spent
        FROM jsonb_array_elements(v_parts) WITH ORDINALITY AS p(d, ord)
        WHERE (p.d->>'take')::bigint > 0;
        INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, hold_id, created_at)
        VALUES (v_tx, v_customer, 'consume', -v_captured, b_balance, h.reason, h.metadata::jsonb, v_spent, v_key, h.id, v_now);
    END IF;
    UPDATE credit_holds ch SET status = 'captured', captured = v_captured, released = h.amount - v_captured,
           transaction_id = v_tx, ended_at = v_now
    WHERE ch.id = h.id;
    UPDATE credit_balances b
    SET balance = b_balance, next_expiry = b_next_expiry, low_balance_notified = (v_below AND b_notified),
        held = b_held, next_hold_expiry = b_next_hold_expiry,
        default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
        updated_at = v_now
    WHERE b.customer_id = v_customer;
    available := credits_available(v_customer, v_now);
    balance := b_balance;
    v_answer := jsonb_strip_nulls(jsonb_build_object('hold_id', h.id, 'status', 'captured', 'captured', v_captured,
        'released', h.amount - v_captured, 'transaction_id', v_tx, 'balance', b_balance, 'available', available))::text;
    INSERT INTO events (type, customer_id, data) VALUES ('credits.captured', v_customer, v_answer::jsonb - 'status' || jsonb_build_object('customer_id', v_customer));
    IF v_captured > 0 THEN
        INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
        VALUES (v_customer, (v_now AT TIME ZONE 'UTC')::date, v_captured)
        ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed;
    END IF;
    UPDATE idempotency_keys k SET result = convert_to(v_answer, 'UTF8'), completed_at = now()
    WHERE k.scope = v_scope AND k.key = v_key;
    status := 'ok'; result := v_answer;
END;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- go_time is a time as Go's encoding/json writes it (RFC 3339, UTC, the
-- fraction without trailing zeros), so that what the batch stores and
-- emits reads as what the full path's json.Marshal writes.
CREATE FUNCTION credits_go_time(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT regexp_replace(to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '\.?0+$', '') || 'Z'
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION credits_hold_one(it jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                 OUT status text, OUT result text, OUT balance bigint, OUT available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_customer text := it->>'customer'; v_scope text := it->>'scope'; v_key text := it->>'key';
    v_amount bigint := (it->>'amount')::bigint; v_hold text := it->>'hold';
    b_balance bigint; b_next_expiry timestamptz; b_held bigint; b_next_hold_expiry timestamptz;
    b_notified boolean; b_threshold bigint; b_updated_at timestamptz; b_thresholds bigint[];
    b_pending bigint; b_top_up_below bigint;
    v_now timestamptz; v_total bigint; v_draws jsonb; v_before bigint; v_after bigint; v_below boolean;
    v_expires timestamptz; v_answer jsonb;
BEGIN
    SELECT b.balance, b.next_expiry, b.held, b.next_hold_expiry, b.low_balance_notified,
           COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold), b.updated_at,
           c.low_balance_thresholds
    INTO b_balance, b_next_expiry, b_held, b_next_hold_expiry, b_notified, b_threshold, b_updated_at, b_thresholds
    FROM credit_balances b JOIN customers c ON c.id = b.customer_id
    WHERE b.customer_id = v_customer
    FOR UPDATE OF b SKIP LOCKED;
    IF NOT FOUND AND EXISTS (SELECT 1 FROM credit_balances b WHERE b.customer_id = v_customer) THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    IF NOT FOUND THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        IF EXISTS (SELECT 1 FROM customers c WHERE c.id = v_customer) THEN
            status := 'insufficient'; balance := 0; available := 0;
        ELSE
            status := 'notfound';
        END IF;
        RETURN;
    END IF;
    v_now := greatest(p_now, b_updated_at);
    IF b_next_hold_expiry <= v_now OR b_next_expiry <= v_now THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    -- What is available of each grant in draw order, and what the hold
    -- keeps of each (hold() in holds.go).
    WITH cand AS (
        SELECT g.id, g.remaining - g.held AS free,
               (sum(g.remaining - g.held) OVER w)::bigint AS run,
               row_number() OVER w AS rn
        FROM credit_grants g
        WHERE g.customer_id = v_customer AND g.remaining > 0 AND g.remaining > g.held
          AND (g.expires_at IS NULL OR g.expires_at > v_now) AND (g.effective_at IS NULL OR g.effective_at <= v_now)
        WINDOW w AS (ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id)
    )
    SELECT COALESCE((SELECT max(run) FROM cand), 0),
           (SELECT jsonb_agg(jsonb_build_object('grant_id', cand.id, 'amount', LEAST(cand.free, v_amount - (cand.run - cand.free))) ORDER BY cand.rn)
            FROM cand WHERE cand.run - cand.free < v_amount)
    INTO v_total, v_draws;
    IF v_total < v_amount THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'insufficient'; balance := b_balance; available := v_total; RETURN;
    END IF;
    b_pending := credits_pending(v_customer, v_now);
    v_before := b_balance - b_held - b_pending;
    v_after := v_before - v_amount;
    v_below := b_threshold > 0 AND v_after < b_threshold;
    b_top_up_below := 0;
    IF p_top_up THEN
        b_top_up_below := credits_top_up_below(v_customer, v_now);
    END IF;
    IF (v_below AND NOT b_notified)
       OR EXISTS (SELECT 1 FROM unnest(b_thresholds) t WHERE t <> b_threshold AND v_before >= t AND v_after < t)
       OR (b_top_up_below > 0 AND v_after < b_top_up_below) THEN
        DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
        status := 'defer'; RETURN;
    END IF;
    UPDATE credit_grants g SET held = g.held + (d.d->>'amount')::bigint
    FROM jsonb_array_elements(v_draws) AS d(d) WHERE g.id = d.d->>'grant_id';
    v_expires := v_now + make_interval(secs => (it->>'expires_in')::double precision);
    INSERT INTO credit_holds (id, customer_id, amount, status, reason, metadata, draws, idempotency_key, expires_at, created_at)
    VALUES (v_hold, v_customer, v_amount, 'active', it->>'reason', COALESCE(it->'metadata', '{}'::jsonb), v_draws, v_key, v_expires, v_now);
    b_held := b_held + v_amount;
    IF b_next_hold_expiry IS NULL OR v_expires < b_next_hold_expiry THEN
        b_next_hold_expiry := v_expires;
    END IF;
    UPDATE credit_balances b
    SET held = b_held, next_hold_expiry = b_next_hold_expiry, low_balance_notified = (v_below AND b_notified),
        default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
        updated_at = v_now
    WHERE b.customer_id = v_customer;
    available := v_total - v_amount; balance := b_balance;
    INSERT INTO events (type, customer_id, data) VALUES ('credits.held', v_customer, jsonb_build_object(
        'customer_id', v_customer, 'hold_id', v_hold, 'amount', v_amount, 'reason', it->>'reason',
        'expires_at', credits_go_time(v_expires), 'balance', b_balance, 'available', available));
    v_answer := jsonb_build_object('hold_id', v_hold, 'amount', v_amount, 'status', 'active',
        'expires_at', credits_go_time(v_expires), 'balance', b_balance, 'available', available);
    UPDATE idempotency_keys k SET result = convert_to(v_answer::text, 'UTF8'), completed_at = now()
    WHERE k.scope = v_scope AND k.key = v_key;
    status := 'ok'; result := v_answer::text;
END;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- credits_consume_run applies consecutive consumes of one customer (a hot
-- customer's batch) as credits_consume_one would one by one, but reads the
-- account and its grants once and writes each row once: the grants, the
-- balance and the rollup with the run's totals, the ledger entries (in
-- order, each with its own draws and balance_after) and the keys' answers
-- in one statement each. Updating the same rows once per consume inside
-- one transaction costs more with every version it leaves behind.
CREATE FUNCTION credits_consume_run(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    p_lease double precision, p_retention double precision)
RETURNS TABLE (status text, result text, balance bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    it jsonb;
    v_customer text := items->0->>'customer';
    v_scope text; v_key text; v_hash bytea; v_amount bigint; v_id text;
    n bigint; stop boolean := false; run_answers jsonb := '{}';
    k_hash bytea; k_result bytea; k_done boolean; k_expired boolean; k_abandoned boolean;
    b_balance bigint; b_next_expiry timestamptz; b_held bigint; b_next_hold_expiry timestamptz;
    b_notified boolean; b_threshold bigint; b_updated_at timestamptz; b_thresholds bigint[];
    b_pending bigint; b_top_up_below bigint := 0; b_start_balance bigint;
    v_now timestamptz; v_spendable bigint; v_after bigint; v_below boolean;
    g_ids text[]; g_free bigint[]; g_take bigint[]; v_total bigint; v_left bigint; v_t bigint; i int;
    v_draws jsonb; v_answer text; v_consumed bigint := 0;
    l_ids text[] := '{}'; l_amounts bigint[] := '{}'; l_after bigint[] := '{}'; l_reasons text[] := '{}';
    l_meta jsonb[] := '{}'; l_draws jsonb[] := '{}'; l_keys text[] := '{}'; l_scopes text[] := '{}'; l_answers text[] := '{}';
    locked boolean := false;
BEGIN
    FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
        v_scope := it->>'scope'; v_key := it->>'key'; v_hash := decode(it->>'hash', 'hex');
        v_amount := (it->>'amount')::bigint; v_id := it->>'id';
        status := NULL; result := NULL; balance := NULL; available := NULL;
        IF stop THEN
            status := 'defer'; RETURN NEXT; CONTINUE;
        END IF;
        INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at)
        VALUES (v_scope, v_key, v_hash, now() + make_interval(secs => p_lease))
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            IF run_answers ? (v_scope || ' ' || v_key) THEN
                -- A duplicate of an earlier consume of this run.
                IF run_answers->(v_scope || ' ' || v_key)->>'hash' <> (it->>'hash') THEN
                    status := 'reused';
                ELSE
                    status := 'replay'; result := run_answers->(v_scope || ' ' || v_key)->>'answer';
                END IF;
                RETURN NEXT; CONTINUE;
            END IF;
            SELECT k.request_hash, k.result, k.completed_at IS NOT NULL,
                   k.created_at < now() - make_interval(secs => p_retention),
                   COALESCE(k.lease_expires_at, k.created_at + make_interval(secs => p_lease)) < now()
            INTO k_hash, k_result, k_done, k_expired, k_abandoned
            FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key FOR UPDATE;
            IF NOT FOUND OR k_expired OR (NOT k_done AND k_abandoned) THEN
                stop := true; status := 'defer'; RETURN NEXT; CONTINUE;
            END IF;
            IF k_hash <> v_hash THEN
                status := 'reused';
            ELSIF NOT k_done THEN
                status := 'inflight';
            ELSE
                status := 'replay'; result := convert_from(k_result, 'UTF8');
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;
        IF NOT locked THEN
            locked := true;
            SELECT b.balance, b.next_expiry, b.held, b.next_hold_expiry, b.low_balance_notified,
                   COALESCE(c.low_balance_threshold, p_default_threshold, b.default_low_balance_threshold), b.updated_at,
                   c.low_balance_thresholds
            INTO b_balance, b_next_expiry, b_held, b_next_hold_expiry, b_notified, b_threshold, b_updated_at, b_thresholds
            FROM credit_balances b JOIN customers c ON c.id = b.customer_id
            WHERE b.customer_id = v_customer
            FOR UPDATE OF b SKIP LOCKED;
            IF NOT FOUND THEN
                -- Locked elsewhere, never granted, or unknown: one by one,
                -- credits_consume_one answers each case.
                DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
                stop := true; status := 'defer'; RETURN NEXT; CONTINUE;
            END IF;
            v_now := greatest(p_now, b_updated_at);
            IF b_next_hold_expiry <= v_now OR b_next_expiry <= v_now THEN
                DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
                stop := true; status := 'defer'; RETURN NEXT; CONTINUE;
            END IF;
            b_pending := credits_pending(v_customer, v_now);
            IF p_top_up THEN
                b_top_up_below := credits_top_up_below(v_customer, v_now);
            END IF;
            SELECT COALESCE(array_agg(g.id ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id), '{}'),
                   COALESCE(array_agg(g.remaining - g.held ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id), '{}')
            INTO g_ids, g_free
            FROM credit_grants g
            WHERE g.customer_id = v_customer AND g.remaining > 0 AND g.remaining > g.held
              AND (g.expires_at IS NULL OR g.expires_at > v_now) AND (g.effective_at IS NULL OR g.effective_at <= v_now);
            g_take := array_fill(0::bigint, ARRAY[cardinality(g_ids)]);
            b_start_balance := b_balance;
        END IF;
        SELECT COALESCE(sum(f), 0)::bigint INTO v_total FROM unnest(g_free) f;
        IF v_total < v_amount THEN
            DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
            status := 'insufficient'; balance := b_balance; available := v_total; RETURN NEXT; CONTINUE;
        END IF;
        v_spendable := b_balance - b_held - b_pending;
        v_after := v_spendable - v_amount;
        v_below := b_threshold > 0 AND v_after < b_threshold;
        IF (v_below AND NOT b_notified)
           OR EXISTS (SELECT 1 FROM unnest(b_thresholds) t WHERE t <> b_threshold AND v_spendable >= t AND v_after < t)
           OR (b_top_up_below > 0 AND v_after < b_top_up_below) THEN
            DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
            stop := true; status := 'defer'; RETURN NEXT; CONTINUE;
        END IF;
        b_notified := v_below AND b_notified;
        -- The draws, in draw order, from what the run has left.
        v_left := v_amount; v_draws := '[]';
        FOR i IN 1 .. cardinality(g_ids) LOOP
            EXIT WHEN v_left = 0;
            CONTINUE WHEN g_free[i] = 0;
            v_t := LEAST(g_free[i], v_left);
            g_free[i] := g_free[i] - v_t; g_take[i] := g_take[i] + v_t; v_left := v_left - v_t;
            v_draws := v_draws || jsonb_build_array(jsonb_build_object('grant_id', g_ids[i], 'amount', v_t));
        END LOOP;
        b_balance := b_balance - v_amount;
        v_consumed := v_consumed + v_amount;
        v_answer := jsonb_build_object('transaction_id', v_id, 'amount', v_amount, 'balance', b_balance)::text;
        l_ids := l_ids || v_id; l_amounts := l_amounts || (-v_amount); l_after := l_after || b_balance;
        l_reasons := l_reasons || (it->>'reason'); l_meta := l_meta || COALESCE(it->'metadata', '{}'::jsonb);
        l_draws := l_draws || v_draws; l_keys := l_keys || v_key; l_scopes := l_scopes || v_scope; l_answers := l_answers || v_answer;
        run_answers := run_answers || jsonb_build_object(v_scope || ' ' || v_key, jsonb_build_object('hash', it->>'hash', 'answer', v_answer));
        status := 'ok'; result := v_answer; balance := b_balance;
        RETURN NEXT;
    END LOOP;
    IF v_consumed > 0 THEN
        UPDATE credit_grants g SET remaining = g.remaining - t.take
        FROM unnest(g_ids, g_take) AS t(id, take) WHERE g.id = t.id AND t.take > 0;
        UPDATE credit_balances b
        SET balance = b_balance, low_balance_notified = b_notified,
            default_low_balance_threshold = COALESCE(p_default_threshold, b.default_low_balance_threshold),
            updated_at = v_now
        WHERE b.customer_id = v_customer;
        INSERT INTO credit_consumption_daily AS r (customer_id, day, consumed)
        VALUES (v_customer, (v_now AT TIME ZONE 'UTC')::date, v_consumed)
        ON CONFLICT (customer_id, day) DO UPDATE SET consumed = r.consumed + excluded.consumed;
        INSERT INTO credit_ledger (id, customer_id, kind, amount, balance_after, reason, metadata, draws, idempotency_key, created_at)
        SELECT e.id, v_customer, 'consume', e.amount, e.after, e.reason, e.meta, e.draws, e.key, v_now
        FROM unnest(l_ids, l_amounts, l_after, l_reasons, l_meta, l_draws, l_keys) WITH ORDINALITY
             AS e(id, amount, after, reason, meta, draws, key, ord)
        ORDER BY e.ord;
        UPDATE idempotency_keys k SET result = convert_to(a.answer, 'UTF8'), completed_at = now()
        FROM unnest(l_scopes, l_keys, l_answers) AS a(scope, key, answer)
        WHERE k.scope = a.scope AND k.key = a.key;
    END IF;
END;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION credits_consume_batch(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                      p_lease double precision, p_retention double precision)
RETURNS TABLE (status text, result text, balance bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    it jsonb;
    v_customer text; v_scope text; v_key text; v_hash bytea;
    deferred text[] := '{}';
    n bigint;
    k_hash bytea; k_result bytea; k_done boolean; k_expired boolean; k_abandoned boolean;
    r record; pos int := 0; len int := jsonb_array_length(items); run_end int; deferred_run boolean;
BEGIN
    WHILE pos < len LOOP
        it := items->pos;
        v_customer := it->>'customer'; v_scope := it->>'scope'; v_key := it->>'key';
        v_hash := decode(it->>'hash', 'hex');
        status := NULL; result := NULL; balance := NULL; available := NULL;
        pos := pos + 1;
        -- Consecutive consumes of one customer go together.
        run_end := pos;
        IF it->>'kind' = 'consume' AND NOT v_customer = ANY (deferred) THEN
            WHILE run_end < len AND items->run_end->>'kind' = 'consume' AND items->run_end->>'customer' = v_customer LOOP
                run_end := run_end + 1;
            END LOOP;
        END IF;
        IF run_end > pos THEN
            deferred_run := false;
            FOR r IN SELECT * FROM credits_consume_run(
                    (SELECT jsonb_agg(items->x ORDER BY x) FROM generate_series(pos - 1, run_end - 1) x),
                    p_now, p_default_threshold, p_top_up, p_lease, p_retention) LOOP
                status := r.status; result := r.result; balance := r.balance; available := r.available;
                deferred_run := deferred_run OR status = 'defer';
                RETURN NEXT;
            END LOOP;
            IF deferred_run THEN
                deferred := deferred || v_customer;
            END IF;
            pos := run_end;
            CONTINUE;
        END IF;
        IF v_customer = ANY (deferred) THEN
            -- After a deferred one, the customer's later items keep their
            -- order by following it.
            status := 'defer'; RETURN NEXT; CONTINUE;
        END IF;

        -- The claim, as db.Once makes it: the INSERT waits for another
        -- transaction holding the same key, then the row is ours or a
        -- committed (or, within this batch, an earlier item's) one.
        INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at)
        VALUES (v_scope, v_key, v_hash, now() + make_interval(secs => p_lease))
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            SELECT k.request_hash, k.result, k.completed_at IS NOT NULL,
                   k.created_at < now() - make_interval(secs => p_retention),
                   COALESCE(k.lease_expires_at, k.created_at + make_interval(secs => p_lease)) < now()
            INTO k_hash, k_result, k_done, k_expired, k_abandoned
            FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key FOR UPDATE;
            IF NOT FOUND OR k_expired OR (NOT k_done AND k_abandoned) THEN
                -- Purged meanwhile, or to be taken over: the full path does it.
                deferred := deferred || v_customer; status := 'defer'; RETURN NEXT; CONTINUE;
            END IF;
            IF k_hash <> v_hash THEN
                status := 'reused';
            ELSIF NOT k_done THEN
                status := 'inflight';
            ELSE
                status := 'replay'; result := convert_from(k_result, 'UTF8');
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;

        IF it->>'kind' = 'capture' THEN
            SELECT * INTO status, result, balance, available FROM credits_capture_one(it, p_now, p_default_threshold, p_top_up);
        ELSIF it->>'kind' = 'hold' THEN
            SELECT * INTO status, result, balance, available FROM credits_hold_one(it, p_now, p_default_threshold, p_top_up);
        ELSE
            SELECT * INTO status, result, balance, available FROM credits_consume_one(it, p_now, p_default_threshold, p_top_up);
        END IF;
        IF status = 'defer' THEN
            deferred := deferred || v_customer;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION credits_consume_batch(jsonb, timestamptz, bigint, boolean, double precision, double precision);
DROP FUNCTION credits_consume_run(jsonb, timestamptz, bigint, boolean, double precision, double precision);
DROP FUNCTION credits_capture_one(jsonb, timestamptz, bigint, boolean);
DROP FUNCTION credits_hold_one(jsonb, timestamptz, bigint, boolean);
DROP FUNCTION credits_go_time(timestamptz);
DROP FUNCTION credits_top_up_below(text, timestamptz);
DROP FUNCTION credits_available(text, timestamptz);
DROP FUNCTION credits_pending(text, timestamptz);
DROP FUNCTION credits_consume_one(jsonb, timestamptz, bigint, boolean);
