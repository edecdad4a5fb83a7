-- The factory's DuckDB store (schema version 4; bump factory.store.SCHEMA_VERSION on any change).
-- Static tables live in `main`. Each domain also gets a schema named after it holding
-- `<domain>.records` (one typed column per spec column) and a `<domain>.lineage` view;
-- those are derived from the domain's TableSpec by factory/store.py.

CREATE TABLE meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- One row per `factory generate`. Counters are updated in the same transaction as
-- each batch's records and rejections, so they always match the tables.
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    domain VARCHAR NOT NULL,
    model_id VARCHAR NOT NULL,          -- lineage: "baseline", "difflm", ...
    model_version VARCHAR NOT NULL,     -- checksum of the fitted state / weights
    seed BIGINT NOT NULL,
    requested_n BIGINT NOT NULL,
    batch_size BIGINT NOT NULL,
    rule_set_hash VARCHAR NOT NULL,     -- which spec + rules judged the records
    factory_version VARCHAR NOT NULL,
    settings VARCHAR NOT NULL,          -- JSON text: everything else that shaped the run
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    -- 'gate_failed': every record was generated and stored, but the distribution gate
    -- failed (see `checks`) and the run was not overridden, so it is not exported.
    status VARCHAR NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'gate_failed')),
    -- distribution gate outcome; NULL when no gate ran (a failed run, or gates turned off)
    gate VARCHAR CHECK (gate IN ('passed', 'failed', 'overridden', 'skipped')),
    attempted BIGINT NOT NULL DEFAULT 0,  -- = accepted + rejected (distinct attempt ids)
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    surplus BIGINT NOT NULL DEFAULT 0     -- valid texts generated after the n-th acceptance; not stored
);

-- A run is split into shards (one, unless `--shards K`): shard s produces its share of
-- requested_n with its own seeds, batches and attempt ids. Counters are per shard here
-- and summed into `runs` in the same transaction. A shard is 'done' once it has all its
-- records; the Ray engine ingests a finished shard in one transaction, exactly once.
CREATE TABLE shards (
    run_id VARCHAR NOT NULL,
    shard BIGINT NOT NULL,
    requested_n BIGINT NOT NULL,
    status VARCHAR NOT NULL CHECK (status IN ('pending', 'running', 'done')),
    batches BIGINT NOT NULL DEFAULT 0,    -- batches committed (the next batch's index)
    attempted BIGINT NOT NULL DEFAULT 0,
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    surplus BIGINT NOT NULL DEFAULT 0,
    worker VARCHAR,                       -- who produced it: 'local' or a Ray node/worker id
    finished_at TIMESTAMP,
    PRIMARY KEY (run_id, shard)
);

-- One row per failing rule per attempt: a text that breaks three rules has three rows.
-- attempt_id is the index of the generated text within its shard. Stage 'privacy' rows
-- (rule exact_copy / near_copy) reject single records like rule failures. Stage
-- 'distribution' rows reject a whole run (one per failed gate check, rule = check name):
-- they have attempt_id, batch and raw_text NULL and are not counted in runs.rejected.
CREATE TABLE rejections (
    run_id VARCHAR NOT NULL,
    shard BIGINT,
    attempt_id BIGINT,
    batch BIGINT,
    stage VARCHAR NOT NULL CHECK (stage IN ('parse', 'schema', 'rule', 'distribution', 'privacy', 'condition')),
    rule VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    raw_text VARCHAR,
    CHECK ((stage = 'distribution') = (attempt_id IS NULL)),
    CHECK (attempt_id IS NULL OR (shard IS NOT NULL AND batch IS NOT NULL AND raw_text IS NOT NULL))
);

-- One row per distribution-gate check per run (factory/checks/distribution.py): the
-- statistic of the run's records against the train split, and the threshold it met or not.
-- direction '<=': the statistic must not exceed the threshold; '>=': it must reach it.
-- A skipped check (too few records or values) has statistic and passed NULL and says why.
CREATE TABLE checks (
    run_id VARCHAR NOT NULL,
    check_name VARCHAR NOT NULL,        -- stable: ks:<col>, q05/q50/q95:<col>, tvd:<col>, coverage:<col>, corr:max
    column_names VARCHAR NOT NULL,      -- comma-separated
    statistic DOUBLE,
    threshold DOUBLE,
    direction VARCHAR NOT NULL CHECK (direction IN ('<=', '>=')),
    status VARCHAR NOT NULL CHECK (status IN ('passed', 'failed', 'skipped')),
    passed BOOLEAN,                     -- NULL when skipped
    detail VARCHAR NOT NULL,
    PRIMARY KEY (run_id, check_name),
    CHECK ((status = 'skipped') = (passed IS NULL))
);
