-- The control plane's metadata on PostgreSQL: the same tables and rules as
-- migrations/sqlite (0001 and 0002 together), in PostgreSQL's types. See
-- src/postgres.rs for how concurrent writers from several replicas are kept
-- apart.
--
-- Enumerations are stored as stable text and translated in one place
-- (src/codec.rs); a value the code does not know is reported as corruption,
-- never guessed at, and there is no CHECK listing them, so that a new state
-- needs no schema change.
--
-- Every identifier column is COLLATE "C": the store returns orgs, keys and
-- KEKs "in id order", which callers compare with Rust's byte order, and pages
-- through KEKs with `kek_id > $after`. Under the database's default collation
-- (en-US, say) 'contract-_' would sort before 'contract-B', and a page
-- boundary would skip or repeat KEKs. Byte order is also the cheapest to
-- compare.
--
-- A released migration is never edited (sqlx refuses to start on a checksum
-- mismatch): change the schema with a new file.

CREATE TABLE orgs (
    org     text    COLLATE "C" NOT NULL PRIMARY KEY,
    byok    boolean NOT NULL,
    -- Optimistic concurrency: every commit names the version it read.
    version bigint  NOT NULL CHECK (version >= 1)
);

CREATE TABLE keys (
    org                        text    COLLATE "C" NOT NULL REFERENCES orgs (org),
    key_id                     text    COLLATE "C" NOT NULL,
    -- Insertion order within the org, which `keys` is returned in; an update
    -- keeps the key's place.
    position                   bigint  NOT NULL,
    handle                     text    COLLATE "C" NOT NULL,
    source                     text    NOT NULL,
    state                      text    NOT NULL,
    check_value                text    NOT NULL,
    created_at                 bigint  NOT NULL,
    activated_at               bigint,
    revoked_at                 bigint,
    expires_at                 bigint,
    needed                     boolean NOT NULL,
    before_provider_revocation text,
    PRIMARY KEY (org, key_id),
    UNIQUE (org, position)
);

-- The expiry sweep: keys in a given state whose time is up.
CREATE INDEX keys_by_state_expiry ON keys (state, expires_at);

-- Which orgs still use a handle: every org without BYOK shares the generic
-- default key's, so this may be many rows.
CREATE INDEX keys_by_handle ON keys (handle);

-- One hash chain per org (see the domain's `audit` module). Rows of orgs that
-- were never enrolled are kept too: a refused call on an unknown org is
-- audited, so there is no foreign key to `orgs`.
CREATE TABLE audit (
    org       text   COLLATE "C" NOT NULL,
    seq       bigint NOT NULL CHECK (seq >= 1),
    time      bigint NOT NULL,
    actor     text   NOT NULL,
    key       text,
    action    text   NOT NULL,
    result    text   NOT NULL,
    prev_hash bytea  NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash      bytea  NOT NULL CHECK (octet_length(hash) = 32),
    PRIMARY KEY (org, seq)
);

-- The audit log is append-only. Tamper evidence is the hash chain; these
-- triggers stop accidents (a stray UPDATE or TRUNCATE in a maintenance
-- shell), not an attacker who can drop them. `INSERT ... ON CONFLICT DO
-- UPDATE` fires the update trigger, so it cannot replace a row either.
CREATE FUNCTION audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit rows are append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- A row inserted out of turn breaks the chain: every insert must extend its
-- org's chain by exactly one. A row-level BEFORE trigger sees the rows an
-- earlier part of the same statement inserted, so a multi-row insert of
-- several events is checked row by row too.
CREATE FUNCTION audit_append_in_order() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS DISTINCT FROM
           (SELECT coalesce(max(seq), 0) + 1 FROM audit WHERE org = NEW.org)
       OR NEW.prev_hash IS DISTINCT FROM coalesce(
           (SELECT hash FROM audit WHERE org = NEW.org AND seq = NEW.seq - 1),
           '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
    THEN
        RAISE EXCEPTION 'audit rows must extend their organisation''s chain by one';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_append_in_order BEFORE INSERT ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_in_order();

-- Custody calls that may not have completed (see the crate docs). `id` only
-- orders intents recorded in the same second.
CREATE TABLE intents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    handle     text   COLLATE "C" NOT NULL UNIQUE,
    kind       text   NOT NULL,
    org        text   COLLATE "C",
    created_at bigint NOT NULL
);

-- The service's one generic default key.
CREATE TABLE generic_key (
    id          integer NOT NULL PRIMARY KEY CHECK (id = 1),
    handle      text    COLLATE "C" NOT NULL,
    check_value text    NOT NULL,
    created_at  bigint  NOT NULL
);

-- Generic default keys replaced by a renewal whose material is not yet
-- destroyed. `id` orders keys created in the same second.
CREATE TABLE retired_generic_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    handle      text   COLLATE "C" NOT NULL UNIQUE,
    check_value text   NOT NULL,
    created_at  bigint NOT NULL
);

-- Every KEK of every org, wrapped by one of its org's keys. KEK ids are
-- random, so they are unique across orgs without a constraint saying so;
-- every query names the org anyway.
--
-- As in SQLite, deliberately no index on `key_id` and no foreign key to
-- `keys`: a rotation rewrites `key_id` in every row. With no indexed column
-- changing, a re-wrap can be a heap-only tuple (HOT) update, which writes no
-- index entry, if the row's page has room for its new version; a rotation
-- rewrites every row once, so each page is left half free. Measured with
-- 200 000 KEKs re-wrapped a page of 1000 at a time (the rotation's pattern):
-- fill factor 100 took 2.7-3.0 s with no HOT update, 80 took 2.4 s with 27%,
-- 50 took 1.3-1.5 s with all of them, and its heap ended no larger (60 MB):
-- at 100 the table grows to hold the new versions anyway. How many KEKs each
-- key wraps is kept in `kek_counts` instead of an index.
CREATE TABLE keks (
    org        text   COLLATE "C" NOT NULL REFERENCES orgs (org),
    kek_id     text   COLLATE "C" NOT NULL,
    resource   text   COLLATE "C" NOT NULL,
    key_id     text   COLLATE "C" NOT NULL,
    wrapped    bytea  NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (org, kek_id),
    -- One KEK per resource and org; also the lookup of `insert_kek`.
    UNIQUE (org, resource)
) WITH (fillfactor = 50);

-- How many KEKs of the org each key wraps, so that `kek_counts`, a job's
-- total and the check that a key about to be deactivated wraps none read a
-- few rows instead of counting an org's KEKs. Every transaction that adds a
-- KEK or changes its key updates this table (src/ops.rs:
-- `insert_counted_keks` and `rewrap_keks`); a key whose KEKs were all
-- re-wrapped keeps its row, at zero.
CREATE TABLE kek_counts (
    org    text   COLLATE "C" NOT NULL,
    key_id text   COLLATE "C" NOT NULL,
    keks   bigint NOT NULL CHECK (keks >= 0),
    PRIMARY KEY (org, key_id)
);

-- Re-wrap jobs, numbered from 1 within each org.
CREATE TABLE rotation_jobs (
    org        text   COLLATE "C" NOT NULL REFERENCES orgs (org),
    job        bigint NOT NULL CHECK (job >= 1),
    target     text   COLLATE "C" NOT NULL,
    total      bigint NOT NULL CHECK (total >= 0),
    done       bigint NOT NULL CHECK (done >= 0),
    started_at bigint NOT NULL,
    ended_at   bigint,
    state      text   NOT NULL,
    PRIMARY KEY (org, job)
);

-- At most one running job per org, which `running_rotations` also reads.
-- 'running' must match codec::job_state(JobState::Running); an index, unlike
-- a CHECK, can be dropped and recreated if that ever changes.
CREATE UNIQUE INDEX rotation_jobs_one_running ON rotation_jobs (org)
    WHERE state = 'running';

-- The keys a job rotates away from, in the order given.
CREATE TABLE rotation_job_from (
    org      text   COLLATE "C" NOT NULL,
    job      bigint NOT NULL,
    position bigint NOT NULL,
    key_id   text   COLLATE "C" NOT NULL,
    PRIMARY KEY (org, job, position),
    FOREIGN KEY (org, job) REFERENCES rotation_jobs (org, job)
);
