-- A consume set (migration 00049) no longer deadlocks with a transaction
-- that holds one of its keys and waits for the customer's balance row (see
-- credits_consume_batch below): the set gives up on a lock after 50 ms,
-- rolling back what it did, and the batch's items go one by one.

-- +goose Up
ALTER FUNCTION credits_consume_set(jsonb, timestamptz, bigint, boolean, double precision) SET lock_timeout = '50ms';

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_batch(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
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
    fast_result text[] := '{}'; fast_balance bigint[] := '{}';
BEGIN
    -- First, together, the consumes credits_consume_set can apply (the
    -- only item of their customer, one draw, nothing else due); the loop
    -- below answers them in their places and runs the rest as before.
    --
    -- credits_consume_set takes its customers' balance rows before it
    -- writes their keys, where db.Once (and this loop) claim the key first
    -- and then wait for the balance row: a key another transaction holds
    -- (a copy of the request on another server, or another endpoint sent
    -- the same key, in the same scope) while it waits for a balance row
    -- the set holds is a deadlock, which PostgreSQL breaks only after
    -- deadlock_timeout, by aborting this batch (it waited first): every
    -- consume in it would wait a second and then go the full path, at the
    -- will of any end user with two requests. So the set waits for a lock
    -- no longer than its lock_timeout (migration 00052), in a block of its
    -- own: when it times out, the block's rollback releases the balance
    -- rows it took, and every item goes through the loop below, which
    -- claims each key before its balance row, as before 00049.
    BEGIN
        FOR r IN SELECT * FROM credits_consume_set(items, p_now, p_default_threshold, p_top_up, p_lease) LOOP
            fast_result[r.pos + 1] := r.result; fast_balance[r.pos + 1] := r.balance;
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        fast_result := '{}'; fast_balance := '{}';
    END;
    WHILE pos < len LOOP
        it := items->pos;
        v_customer := it->>'customer'; v_scope := it->>'scope'; v_key := it->>'key';
        v_hash := decode(it->>'hash', 'hex');
        status := NULL; result := NULL; balance := NULL; available := NULL;
        pos := pos + 1;
        IF fast_result[pos] IS NOT NULL THEN
            status := 'ok'; result := fast_result[pos]; balance := fast_balance[pos];
            RETURN NEXT; CONTINUE;
        END IF;
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
ALTER FUNCTION credits_consume_set(jsonb, timestamptz, bigint, boolean, double precision) RESET lock_timeout;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_consume_batch(items jsonb, p_now timestamptz, p_default_threshold bigint, p_top_up boolean,
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
    fast_result text[] := '{}'; fast_balance bigint[] := '{}';
BEGIN
    -- First, together, the consumes credits_consume_set can apply (the
    -- only item of their customer, one draw, nothing else due); the loop
    -- below answers them in their places and runs the rest as before.
    FOR r IN SELECT * FROM credits_consume_set(items, p_now, p_default_threshold, p_top_up, p_lease) LOOP
        fast_result[r.pos + 1] := r.result; fast_balance[r.pos + 1] := r.balance;
    END LOOP;
    WHILE pos < len LOOP
        it := items->pos;
        v_customer := it->>'customer'; v_scope := it->>'scope'; v_key := it->>'key';
        v_hash := decode(it->>'hash', 'hex');
        status := NULL; result := NULL; balance := NULL; available := NULL;
        pos := pos + 1;
        IF fast_result[pos] IS NOT NULL THEN
            status := 'ok'; result := fast_result[pos]; balance := fast_balance[pos];
            RETURN NEXT; CONTINUE;
        END IF;
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
