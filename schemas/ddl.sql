-- The factory's DuckDB store (schema version 1; bump factory.store.SCHEMA_VERSION on any change).
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
    status VARCHAR NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    attempted BIGINT NOT NULL DEFAULT 0,  -- = accepted + rejected (distinct attempt ids)
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    surplus BIGINT NOT NULL DEFAULT 0     -- valid texts generated after the n-th acceptance; not stored
);

-- One row per failing rule per attempt: a text that breaks three rules has three rows.
-- attempt_id is the index of the generated text within its run.
CREATE TABLE rejections (
    run_id VARCHAR NOT NULL,
    attempt_id BIGINT NOT NULL,
    batch BIGINT NOT NULL,
    stage VARCHAR NOT NULL CHECK (stage IN ('parse', 'schema', 'rule', 'distribution', 'privacy')),
    rule VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    raw_text VARCHAR NOT NULL
);
