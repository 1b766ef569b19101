-- +goose Up
-- When a fleet-wide background job last started, so that its interval
-- holds across replicas and restarts: a deploy that restarts every replica
-- does not also start a full invariant check on each (on ten million ledger
-- entries it takes both cores of a small database server for a minute).
CREATE TABLE background_runs (
    name        text PRIMARY KEY,
    last_run_at timestamptz NOT NULL
);

-- +goose Down
DROP TABLE background_runs;
