-- A consume batch no longer deadlocks with a batch on another server that
-- holds the same keys in another order. Every key a batch claims stays
-- locked to its commit; migration 00052 bounded the batch's key waits only
-- where it held that customer's balance row, and the loop's other claims
-- (the INSERT ... ON CONFLICT of an item the set did not apply, a run's
-- claims, the FOR UPDATE of a key row already there) waited without a
-- bound, with the keys written by the set and by earlier items held. With
-- every consume sent to both of two servers on one database (two
-- replicas, a client retrying against the other one), each server's batch
-- held some of the keys and waited for the others' (or, in a run of one
-- customer's consumes, held its balance row and waited for a key a full
-- path consume held while it waited for that row): PostgreSQL broke each
-- cycle after deadlock_timeout (1 s) by failing one side, a whole batch,
-- whose consumes then went the full path one by one, or a full path
-- consume, which db.InTx ran again.
-- TestRevcDuplicatesBothServersNoDeadlock (cmd/tally: 512 keys over four
-- customers, 32 clients, each key sent to both servers at once; -race, on
-- the 2-core machine shared with other work) counted in pg_stat_database
-- 2, 3, 2, 2, 3, 2, 5, 4 and 5 deadlocks in nine runs without this
-- migration; the slowest answer took 1.22 to 2.40 s, the run 3.4 to 6.5
-- s. With it: no deadlock in any run, the slowest answer 0.42 to 0.49 s,
-- the run 1.7 to 2.2 s (three runs).
--
-- Now the whole loop runs in one block that waits for a lock 50 ms at
-- most. When a wait runs out, the block rolls back what the loop did (and
-- the locks it took, so the other batch goes on) and every item the set
-- did not apply is answered 'defer': the Go side runs it through the full
-- path once this batch has committed, where a key is waited for with no
-- other key held. What the set applied (in its own block, before) stays.
-- The answers are collected and returned once the loop is over, in input
-- order: rows returned from inside a block are not taken back by its
-- rollback. A batch the set applied whole enters no block.

-- +goose Up
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
    fast_result text[] := '{}'; fast_balance bigint[] := '{}'; n_fast int := 0; v_lock_timeout text;
    -- The answers by position (o: how many so far).
    a_status text[] := '{}'; a_result text[] := '{}'; a_balance bigint[] := '{}'; a_available bigint[] := '{}';
    o int := 0;
BEGIN
    -- First, together, the consumes credits_consume_set can apply (the
    -- only item of their customer, one draw, nothing else due); the loop
    -- below answers them in their places and runs the rest.
    --
    -- Lock order (migrations 00052 and 00055). db.Once claims a key and
    -- then waits for the balance row; credits_consume_set takes its
    -- customers' balance rows and then writes their keys; the loop claims
    -- key after key, each before its balance row, and keeps every one (and
    -- the set's) to the commit. So a batch never waits for a lock longer
    -- than 50 ms: a key another transaction holds may be a copy of the
    -- request on another server, or another endpoint sent the same key in
    -- the same scope (an end user can do it at will), and that transaction
    -- may be waiting for a balance row or a key this batch holds. Waiting
    -- on was a deadlock, which PostgreSQL breaks only after
    -- deadlock_timeout, by failing a whole batch.
    --   * The set waits no longer than its lock_timeout, in a block of its
    --     own, whose rollback releases the balance rows it took; every
    --     item then goes through the loop.
    --   * The loop waits no longer than 50 ms, in one block: when a wait
    --     runs out, what the loop did is rolled back and every item the
    --     set did not apply defers to the full path, which waits for its
    --     key with no other key held once this batch has committed.
    BEGIN
        FOR r IN SELECT * FROM credits_consume_set(items, p_now, p_default_threshold, p_top_up, p_lease) LOOP
            -- (A NULL result is an item the set locked and left to the
            -- loop, whose claim is bounded like any other.)
            IF r.result IS NOT NULL THEN
                fast_result[r.pos + 1] := r.result; fast_balance[r.pos + 1] := r.balance;
                n_fast := n_fast + 1;
            END IF;
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        fast_result := '{}'; fast_balance := '{}'; n_fast := 0;
    END;
    IF n_fast = len THEN
        RETURN QUERY SELECT 'ok'::text, fast_result[g.p], fast_balance[g.p], NULL::bigint
                     FROM generate_series(1, len) AS g(p) ORDER BY g.p;
        RETURN;
    END IF;
    v_lock_timeout := current_setting('lock_timeout');
    BEGIN
        PERFORM set_config('lock_timeout', '50ms', true);
        WHILE pos < len LOOP
            it := items->pos;
            v_customer := it->>'customer'; v_scope := it->>'scope'; v_key := it->>'key';
            v_hash := decode(it->>'hash', 'hex');
            status := NULL; result := NULL; balance := NULL; available := NULL;
            pos := pos + 1;
            IF fast_result[pos] IS NOT NULL THEN
                status := 'ok'; result := fast_result[pos]; balance := fast_balance[pos];
                o := o + 1; a_status[o] := status; a_result[o] := result; a_balance[o] := balance; a_available[o] := available;
                CONTINUE;
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
                    o := o + 1; a_status[o] := status; a_result[o] := result; a_balance[o] := balance; a_available[o] := available;
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
                status := 'defer';
                o := o + 1; a_status[o] := status; a_result[o] := result; a_balance[o] := balance; a_available[o] := available;
                CONTINUE;
            END IF;

            -- The claim, as db.Once makes it: the INSERT waits (50 ms at
            -- most) for another transaction holding the same key, then the
            -- row is ours or a committed (or, within this batch, an
            -- earlier item's) one, whose row the read below locks: a
            -- transaction taking a key over (db.Once) holds that lock
            -- before it waits for the balance row.
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
                    deferred := deferred || v_customer; status := 'defer';
                ELSIF k_hash <> v_hash THEN
                    status := 'reused';
                ELSIF NOT k_done THEN
                    status := 'inflight';
                ELSE
                    status := 'replay'; result := convert_from(k_result, 'UTF8');
                END IF;
                o := o + 1; a_status[o] := status; a_result[o] := result; a_balance[o] := balance; a_available[o] := available;
                CONTINUE;
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
            o := o + 1; a_status[o] := status; a_result[o] := result; a_balance[o] := balance; a_available[o] := available;
        END LOOP;
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    EXCEPTION WHEN lock_not_available THEN
        -- The loop's writes and locks are undone, and so is lock_timeout
        -- (a setting made in a block is rolled back with it). What the set
        -- applied stands; everything else goes the full path, in order.
        a_status := '{}'; a_result := '{}'; a_balance := '{}'; a_available := '{}';
        FOR i IN 1 .. len LOOP
            IF fast_result[i] IS NOT NULL THEN
                a_status[i] := 'ok'; a_result[i] := fast_result[i]; a_balance[i] := fast_balance[i];
            ELSE
                a_status[i] := 'defer';
            END IF;
        END LOOP;
    END;
    -- By subscript: an array's first assignment sets its lower bound.
    RETURN QUERY SELECT a_status[g.p], a_result[g.p], a_balance[g.p], a_available[g.p]
                 FROM generate_series(1, len) AS g(p) ORDER BY g.p;
END;
$$;
-- +goose StatementEnd

-- +goose Down
-- credits_consume_batch as migration 00052 left it.
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
    fast_result text[] := '{}'; fast_balance bigint[] := '{}'; held boolean[] := '{}'; v_lock_timeout text;
BEGIN
    -- First, together, the consumes credits_consume_set can apply (the
    -- only item of their customer, one draw, nothing else due); the loop
    -- below answers them in their places and runs the rest as before.
    --
    -- Lock order (migration 00052). db.Once, and this loop, claim a key
    -- first and then wait for the balance row; credits_consume_set takes
    -- its customers' balance rows first and then writes their keys. A key
    -- another transaction holds (a copy of the request on another server,
    -- or another endpoint sent the same key in the same scope: an end
    -- user can do it at will) while it waits for a balance row the batch
    -- holds is a deadlock, which PostgreSQL breaks only after
    -- deadlock_timeout, by aborting this batch (it waited first): every
    -- consume in it waited a second and then went the full path. Two
    -- places wait for a key with a balance row held:
    --   * the set's own key statement: the set waits for a lock no longer
    --     than its lock_timeout, in a block of its own, whose rollback
    --     releases the balance rows it took; every item then goes
    --     through the loop, which claims each key before its balance row;
    --   * the loop's claim of an item the set locked but left (held),
    --     and its lock of a key row already there: those, too, wait no
    --     longer than 50 ms, in a block, and
    --     the item defers to the full path, which waits for the key
    --     without the balance row once this batch has committed.
    BEGIN
        FOR r IN SELECT * FROM credits_consume_set(items, p_now, p_default_threshold, p_top_up, p_lease) LOOP
            IF r.result IS NULL THEN
                held[r.pos + 1] := true;
            ELSE
                fast_result[r.pos + 1] := r.result; fast_balance[r.pos + 1] := r.balance;
            END IF;
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        fast_result := '{}'; fast_balance := '{}'; held := '{}';
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
        IF COALESCE(held[pos], false) THEN
            -- Its balance row is held (see the set above): wait for the
            -- key briefly, or leave it to the full path.
            v_lock_timeout := current_setting('lock_timeout');
            BEGIN
                PERFORM set_config('lock_timeout', '50ms', true);
                INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at)
                VALUES (v_scope, v_key, v_hash, now() + make_interval(secs => p_lease))
                ON CONFLICT DO NOTHING;
                GET DIAGNOSTICS n = ROW_COUNT;
                IF n = 0 THEN
                    -- The key is there: the read below locks its row, which
                    -- a transaction taking it over (db.Once) holds before
                    -- it waits for the balance row. Taken here, within
                    -- the same bound; the read then has it already.
                    PERFORM 1 FROM idempotency_keys k WHERE k.scope = v_scope AND k.key = v_key FOR UPDATE;
                END IF;
                PERFORM set_config('lock_timeout', v_lock_timeout, true);
            EXCEPTION WHEN lock_not_available THEN
                deferred := deferred || v_customer; status := 'defer'; RETURN NEXT; CONTINUE;
            END;
        ELSE
            INSERT INTO idempotency_keys AS k (scope, key, request_hash, lease_expires_at)
            VALUES (v_scope, v_key, v_hash, now() + make_interval(secs => p_lease))
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
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
