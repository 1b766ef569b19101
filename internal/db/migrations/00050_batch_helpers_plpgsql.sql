-- The helpers of the batch functions (migration 00036) as PL/pgSQL, with
-- the same bodies and answers. As SQL functions they cannot be inlined
-- (each has a FROM), so every call went through the SQL-function executor,
-- which parses and plans the body again in each transaction; a PL/pgSQL
-- function keeps its plan for the session. Measured alone in PostgreSQL,
-- one consume a batch through credits_consume_one: 0.54 ms of backend CPU
-- before, 0.38 after. Holds and captures (credits_hold_one,
-- credits_capture_one) call them too.

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_pending(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT COALESCE(sum(g.remaining), 0)::bigint FROM credit_grants g
            WHERE g.customer_id = p_customer AND g.effective_at IS NOT NULL AND g.remaining > 0 AND g.effective_at > p_now);
END $$;
CREATE OR REPLACE FUNCTION credits_available(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT COALESCE(sum(g.remaining - g.held), 0)::bigint FROM credit_grants g
            WHERE g.customer_id = p_customer AND g.remaining > 0 AND g.remaining > g.held
              AND (g.expires_at IS NULL OR g.expires_at > p_now) AND (g.effective_at IS NULL OR g.effective_at <= p_now));
END $$;
CREATE OR REPLACE FUNCTION credits_top_up_below(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN COALESCE((SELECT t.threshold FROM auto_top_up_settings t
                     JOIN customer_payment_methods m ON m.customer_id = t.customer_id
                     WHERE t.customer_id = p_customer AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
                       AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > (p_now AT TIME ZONE 'UTC')
                       AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
                            OR t.month_start IS DISTINCT FROM date_trunc('month', p_now AT TIME ZONE 'UTC')::date)), 0);
END $$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION credits_pending(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(g.remaining), 0)::bigint FROM credit_grants g
    WHERE g.customer_id = p_customer AND g.effective_at IS NOT NULL AND g.remaining > 0 AND g.effective_at > p_now
$$;
CREATE OR REPLACE FUNCTION credits_available(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(g.remaining - g.held), 0)::bigint FROM credit_grants g
    WHERE g.customer_id = p_customer AND g.remaining > 0 AND g.remaining > g.held
      AND (g.expires_at IS NULL OR g.expires_at > p_now) AND (g.effective_at IS NULL OR g.effective_at <= p_now)
$$;
CREATE OR REPLACE FUNCTION credits_top_up_below(p_customer text, p_now timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT t.threshold FROM auto_top_up_settings t
                     JOIN customer_payment_methods m ON m.customer_id = t.customer_id
                     WHERE t.customer_id = p_customer AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
                       AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > (p_now AT TIME ZONE 'UTC')
                       AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
                            OR t.month_start IS DISTINCT FROM date_trunc('month', p_now AT TIME ZONE 'UTC')::date)), 0)
$$;
-- +goose StatementEnd
