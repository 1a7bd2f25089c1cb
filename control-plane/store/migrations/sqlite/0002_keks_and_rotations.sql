-- Key-encryption keys, the rotation jobs that re-wrap them, and the generic
-- default keys retired by a renewal.
--
-- As in 0001: enumerations are stable text translated in src/codec.rs, with
-- no CHECK listing them.

-- Every KEK of every org, wrapped by one of its org's keys.
--
-- WITHOUT ROWID, keyed by (org, kek_id): the rows are small (a ~90-byte
-- ciphertext and a few ids), and a rotation reads an org's KEKs in id order
-- and rewrites each by id, so keeping the rows themselves in that order
-- saves a second B-tree lookup per row. KEK ids are random, so they are
-- unique across orgs without a constraint saying so; every query names the
-- org anyway.
--
-- Deliberately no secondary index on `key_id` and no foreign key to `keys`:
-- a rotation rewrites `key_id` in every row, and SQLite's own work to re-wrap
-- a million KEKs took 7.5 s of CPU with both, 6 s with the index alone and
-- 4 s with neither (on the 2-core machine the rotation is benchmarked on).
-- How many KEKs each key wraps is kept in `kek_counts` instead.
CREATE TABLE keks (
    org        TEXT    NOT NULL REFERENCES orgs (org),
    kek_id     TEXT    NOT NULL,
    resource   TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    wrapped    BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (org, kek_id),
    -- One KEK per resource and org; also the lookup of `insert_kek`.
    UNIQUE (org, resource)
) STRICT, WITHOUT ROWID;

-- How many KEKs of the org each key wraps, so that `kek_counts`, a job's
-- total and the check that a key about to be deactivated wraps none read a
-- few rows instead of counting an org's KEKs. Every statement that adds a
-- KEK or changes its key updates this table in the same transaction
-- (src/sqlite.rs: `insert_kek_rows` and `rewrite_keks`); a key whose KEKs
-- were all re-wrapped keeps its row, at zero.
CREATE TABLE kek_counts (
    org    TEXT    NOT NULL,
    key_id TEXT    NOT NULL,
    keks   INTEGER NOT NULL CHECK (keks >= 0),
    PRIMARY KEY (org, key_id)
) STRICT, WITHOUT ROWID;

-- Re-wrap jobs, numbered from 1 within each org.
CREATE TABLE rotation_jobs (
    org        TEXT    NOT NULL REFERENCES orgs (org),
    job        INTEGER NOT NULL CHECK (job >= 1),
    target     TEXT    NOT NULL,
    total      INTEGER NOT NULL CHECK (total >= 0),
    done       INTEGER NOT NULL CHECK (done >= 0),
    started_at INTEGER NOT NULL,
    ended_at   INTEGER,
    state      TEXT    NOT NULL,
    PRIMARY KEY (org, job)
) STRICT;

-- At most one running job per org, which `running_rotations` also reads.
-- 'running' must match codec::job_state(JobState::Running); an index, unlike
-- a CHECK, can be dropped and recreated if that ever changes.
CREATE UNIQUE INDEX rotation_jobs_one_running ON rotation_jobs (org)
    WHERE state = 'running';

-- The keys a job rotates away from, in the order given (a list of ids in a
-- table of its own rather than encoded in one column).
CREATE TABLE rotation_job_from (
    org      TEXT    NOT NULL,
    job      INTEGER NOT NULL,
    position INTEGER NOT NULL,
    key_id   TEXT    NOT NULL,
    PRIMARY KEY (org, job, position),
    FOREIGN KEY (org, job) REFERENCES rotation_jobs (org, job)
) STRICT, WITHOUT ROWID;

-- Generic default keys replaced by a renewal whose material is not yet
-- destroyed. `id` orders keys created in the same second (an explicit
-- INTEGER PRIMARY KEY, which VACUUM does not renumber).
CREATE TABLE retired_generic_keys (
    id          INTEGER PRIMARY KEY,
    handle      TEXT    NOT NULL UNIQUE,
    check_value TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- Which orgs still use a handle: every org without BYOK shares the generic
-- default key's, so this may be many rows.
CREATE INDEX keys_by_handle ON keys (handle);
