-- A hot customer's run of consumes costs fewer statements (issue 11).
--
-- credits_consume_run applies the consecutive consumes of one customer in a
-- batch (the hot customer's: every request on one balance). It ran three
-- statements of its own for every consume of the run: the key's INSERT,
-- a SELECT summing what the grants have left, and the check of the
-- customer's other thresholds (an EXISTS over them), besides growing a
-- jsonb object of the run's answers by one key each time. One backend runs
-- the run, the customer's balance row locked, while its next batch waits,
-- so what each consume costs there bounds the hot customer.
--
-- Now:
--   * the run's keys are claimed by one INSERT, in arrival order, before
--     anything else (the claims come before the balance row's lock, as
--     db.Once makes them); a key that was not claimed there (another
--     request holds or held it, or it repeats an earlier key of the run)
--     goes as before: its own INSERT, then the stored key read and locked;
--   * the keys claimed for consumes that then write nothing (refused for
--     want of credits, deferred, or left after a deferral) are deleted, as
--     before, so the full path or a retry claims them afresh;
--   * what the grants have left is kept in a variable, lowered by each
--     draw;
--   * the other thresholds are checked by a loop over the array, with no
--     statement;
--   * a key repeated within the run finds its first answer by a loop over
--     the run's keys, only then.
-- The answers, the rows written and their order are as before
-- (TestAHotCustomersBatchWritesWhatOneByOneWrites and the credits
-- package's batch tests).

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_run(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
                                    p_lease double precision, p_retention double precision)
RETURNS TABLE (status text, result text, balance bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    it jsonb;
    v_customer text := items->0->>'customer';
    v_scope text; v_key text; v_hash bytea; v_amount bigint; v_id text;
    n bigint; stop boolean := false;
    k_hash bytea; k_result bytea; k_done boolean; k_expired boolean; k_abandoned boolean;
    b_balance bigint; b_next_expiry timestamptz; b_held bigint; b_next_hold_expiry timestamptz;
    b_notified boolean; b_threshold bigint; b_updated_at timestamptz; b_thresholds bigint[];
    b_pending bigint; b_top_up_below bigint := 0; b_start_balance bigint;
    v_now timestamptz; v_spendable bigint; v_after bigint; v_below boolean; v_cross boolean;
    g_ids text[]; g_free bigint[]; g_take bigint[]; v_total bigint; v_left bigint; v_t bigint; i int; j int;
    v_draws jsonb; v_answer text; v_consumed bigint := 0;
    l_ids text[] := '{}'; l_amounts bigint[] := '{}'; l_after bigint[] := '{}'; l_reasons text[] := '{}';
    l_meta jsonb[] := '{}'; l_draws jsonb[] := '{}'; l_keys text[] := '{}'; l_scopes text[] := '{}'; l_answers text[] := '{}';
    l_hashes text[] := '{}';
    -- The keys the first INSERT claimed ([scope, key]), each taken off when
    -- its consume comes; those left after a deferral are deleted at the end.
    claimed text[]; v_claim text; v_claimed boolean; v_dup boolean;
    locked boolean := false;
BEGIN
    WITH ins AS (
        INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at)
        SELECT x.v->>'scope', x.v->>'key', decode(x.v->>'hash', 'hex'), now() + make_interval(secs => p_lease)
        FROM jsonb_array_elements(items) WITH ORDINALITY AS x(v, ord)
        ORDER BY x.ord
        ON CONFLICT DO NOTHING
        RETURNING k.scope, k.key)
    SELECT COALESCE(array_agg(jsonb_build_array(ins.scope, ins.key)::text), '{}') INTO claimed FROM ins;
    FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
        v_scope := it->>'scope'; v_key := it->>'key'; v_hash := decode(it->>'hash', 'hex');
        v_amount := (it->>'amount')::bigint; v_id := it->>'id';
        status := NULL; result := NULL; balance := NULL; available := NULL;
        IF stop THEN
            status := 'defer'; RETURN NEXT; CONTINUE;
        END IF;
        v_claim := jsonb_build_array(v_scope, v_key)::text;
        v_claimed := v_claim = ANY (claimed);
        IF v_claimed THEN
            claimed := array_remove(claimed, v_claim);
        ELSE
            -- A repeat of an earlier consume of this run.
            v_dup := false;
            FOR j IN 1 .. cardinality(l_keys) LOOP
                IF l_scopes[j] = v_scope AND l_keys[j] = v_key THEN
                    v_dup := true;
                    IF l_hashes[j] <> (it->>'hash') THEN
                        status := 'reused';
                    ELSE
                        status := 'replay'; result := l_answers[j];
                    END IF;
                    EXIT;
                END IF;
            END LOOP;
            IF v_dup THEN
                RETURN NEXT; CONTINUE;
            END IF;
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
                   COALESCE(array_agg(g.remaining - g.held ORDER BY g.priority, g.expires_at NULLS LAST, g.created_at, g.id), '{}'),
                   COALESCE(sum(g.remaining - g.held), 0)::bigint
            INTO g_ids, g_free, v_total
            FROM credit_grants g
            WHERE g.customer_id = v_customer AND g.remaining > 0 AND g.remaining > g.held
              AND (g.expires_at IS NULL OR g.expires_at > v_now) AND (g.effective_at IS NULL OR g.effective_at <= v_now);
            g_take := array_fill(0::bigint, ARRAY[cardinality(g_ids)]);
            b_start_balance := b_balance;
        END IF;
        IF v_total < v_amount THEN
            DELETE FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key;
            status := 'insufficient'; balance := b_balance; available := v_total; RETURN NEXT; CONTINUE;
        END IF;
        v_spendable := b_balance - b_held - b_pending;
        v_after := v_spendable - v_amount;
        v_below := b_threshold > 0 AND v_after < b_threshold;
        v_cross := false;
        IF b_thresholds IS NOT NULL THEN
            FOREACH v_t IN ARRAY b_thresholds LOOP
                IF v_t <> b_threshold AND v_spendable >= v_t AND v_after < v_t THEN
                    v_cross := true;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF (v_below AND NOT b_notified) OR v_cross OR (b_top_up_below > 0 AND v_after < b_top_up_below) THEN
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
        v_total := v_total - v_amount;
        b_balance := b_balance - v_amount;
        v_consumed := v_consumed + v_amount;
        v_answer := jsonb_build_object('transaction_id', v_id, 'amount', v_amount, 'balance', b_balance)::text;
        l_ids := l_ids || v_id; l_amounts := l_amounts || (-v_amount); l_after := l_after || b_balance;
        l_reasons := l_reasons || (it->>'reason'); l_meta := l_meta || COALESCE(it->'metadata', '{}'::jsonb);
        l_draws := l_draws || v_draws; l_keys := l_keys || v_key; l_scopes := l_scopes || v_scope; l_answers := l_answers || v_answer;
        l_hashes := l_hashes || (it->>'hash');
        status := 'ok'; result := v_answer; balance := b_balance;
        RETURN NEXT;
    END LOOP;
    IF cardinality(claimed) > 0 THEN
        -- Claimed for consumes a deferral left: the full path claims them.
        DELETE FROM idempotency_keys k
        USING jsonb_array_elements(items) AS x(v)
        WHERE k.scope = x.v->>'scope' AND k.key = x.v->>'key'
          AND jsonb_build_array(k.scope, k.key)::text = ANY (claimed);
    END IF;
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

-- +goose Down
-- credits_consume_run as migration 00036 made it.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_run(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
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
