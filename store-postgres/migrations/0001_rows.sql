-- Schema 1: the LLM registry's rows, with one index per lifecycle query.
--
-- Names are compared byte by byte (COLLATE "C"), as the core orders them, whatever the
-- database's locale; and no two rows may share a name ignoring ASCII case.
-- Timestamps are milliseconds since the Unix epoch (the core's `Timestamp`), exact and
-- comparable; `live_ms` and `inactive_ms` are the keys the core computes
-- (`LlmRecord::live_since`, `LlmRecord::inactive_key`), NULL when the row is not in
-- that index. A channel binding's epoch is an unsigned 64-bit number: numeric(20, 0).
CREATE TABLE virtual_llm_rows (
    name            text COLLATE "C" PRIMARY KEY,
    id              text NOT NULL,
    revision        bigint NOT NULL CHECK (revision > 0),
    kind            text NOT NULL,
    status          text NOT NULL,
    provider_type   text NOT NULL,
    model           text NOT NULL,
    tier            text,
    owner           text NOT NULL,
    session         text,
    heartbeat_ms    bigint,
    inactive_since_ms bigint,
    created_ms      bigint NOT NULL,
    updated_ms      bigint NOT NULL,
    binding_replica text COLLATE "C",
    binding_epoch   numeric(20, 0),
    pool            text COLLATE "C",
    pool_key        text COLLATE "C" NOT NULL,
    max_concurrent  bigint,
    upstream        text,
    agent           json,
    access          json,
    live_ms         bigint,
    inactive_ms     bigint,
    CHECK ((binding_replica IS NULL) = (binding_epoch IS NULL))
);

CREATE UNIQUE INDEX virtual_llm_rows_name_ci ON virtual_llm_rows (lower(name));
CREATE INDEX virtual_llm_rows_session ON virtual_llm_rows (session, name)
    WHERE session IS NOT NULL;
CREATE INDEX virtual_llm_rows_replica ON virtual_llm_rows (binding_replica, name)
    WHERE binding_replica IS NOT NULL;
CREATE INDEX virtual_llm_rows_pool ON virtual_llm_rows (pool_key, name);
CREATE INDEX virtual_llm_rows_live ON virtual_llm_rows (live_ms, name)
    WHERE live_ms IS NOT NULL;
CREATE INDEX virtual_llm_rows_inactive ON virtual_llm_rows (inactive_ms, name)
    WHERE inactive_ms IS NOT NULL;

-- Replica leases (SPEC §14): each gateway replica's lease runs until `until_ms`; a
-- replica that stops renewing it is found by the expiry index, and its lease is ended
-- with a compare-and-set on `until_ms`.
CREATE TABLE virtual_llm_leases (
    replica  text COLLATE "C" PRIMARY KEY,
    until_ms bigint NOT NULL
);
CREATE INDEX virtual_llm_leases_until ON virtual_llm_leases (until_ms);
