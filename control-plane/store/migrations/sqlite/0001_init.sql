-- The control plane's metadata: orgs and their keys, one audit chain per org,
-- the custody intents and the generic default key.
--
-- Enumerations are stored as stable text and translated in one place
-- (src/codec.rs); a value the code does not know is reported as corruption,
-- never guessed at. There are deliberately no CHECK constraints listing them:
-- SQLite cannot alter a CHECK without rebuilding the table, and a new state
-- must not need that.
--
-- A released migration is never edited (sqlx refuses to start on a checksum
-- mismatch): change the schema with a new file.

CREATE TABLE orgs (
    org     TEXT    NOT NULL PRIMARY KEY,
    byok    INTEGER NOT NULL CHECK (byok IN (0, 1)),
    -- Optimistic concurrency: every commit names the version it read.
    version INTEGER NOT NULL CHECK (version >= 1)
) STRICT;

CREATE TABLE keys (
    org                        TEXT    NOT NULL REFERENCES orgs (org),
    key_id                     TEXT    NOT NULL,
    -- Insertion order within the org, which `keys` is returned in; an update
    -- keeps the key's place.
    position                   INTEGER NOT NULL,
    handle                     TEXT    NOT NULL,
    source                     TEXT    NOT NULL,
    state                      TEXT    NOT NULL,
    check_value                TEXT    NOT NULL,
    created_at                 INTEGER NOT NULL,
    activated_at               INTEGER,
    revoked_at                 INTEGER,
    expires_at                 INTEGER,
    needed                     INTEGER NOT NULL CHECK (needed IN (0, 1)),
    before_provider_revocation TEXT,
    PRIMARY KEY (org, key_id),
    UNIQUE (org, position)
) STRICT;

-- The expiry sweep: keys in a given state whose time is up.
CREATE INDEX keys_by_state_expiry ON keys (state, expires_at);

-- One hash chain per org (see the domain's `audit` module). Rows of orgs that
-- were never enrolled are kept too: a refused call on an unknown org is
-- audited, so there is no foreign key to `orgs`.
CREATE TABLE audit (
    org       TEXT    NOT NULL,
    seq       INTEGER NOT NULL CHECK (seq >= 1),
    time      INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    key       TEXT,
    action    TEXT    NOT NULL,
    result    TEXT    NOT NULL,
    prev_hash BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (org, seq)
) STRICT, WITHOUT ROWID;

-- The audit log is append-only. Tamper evidence is the hash chain; these
-- triggers stop accidents (a stray UPDATE in a maintenance shell), not an
-- attacker who can drop them.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit rows are append-only: UPDATE refused');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit rows are append-only: DELETE refused');
END;

-- INSERT OR REPLACE removes the row it displaces without firing delete
-- triggers (unless recursive_triggers is on), and a row inserted out of turn
-- breaks the chain: every insert must extend its org's chain by exactly one.
CREATE TRIGGER audit_append_in_order BEFORE INSERT ON audit
WHEN NEW.seq IS NOT (SELECT coalesce(max(seq), 0) + 1 FROM audit WHERE org = NEW.org)
  OR NEW.prev_hash IS NOT coalesce(
         (SELECT hash FROM audit WHERE org = NEW.org AND seq = NEW.seq - 1),
         zeroblob(32))
BEGIN
    SELECT RAISE(ABORT, 'audit rows must extend their organisation''s chain by one');
END;

-- Custody calls that may not have completed (see the crate docs). `id` only
-- orders intents recorded in the same second; an explicit INTEGER PRIMARY KEY
-- is used because VACUUM may renumber an implicit rowid.
CREATE TABLE intents (
    id         INTEGER PRIMARY KEY,
    handle     TEXT    NOT NULL UNIQUE,
    kind       TEXT    NOT NULL,
    org        TEXT,
    created_at INTEGER NOT NULL
) STRICT;

-- The service's one generic default key.
CREATE TABLE generic_key (
    id          INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    handle      TEXT    NOT NULL,
    check_value TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
