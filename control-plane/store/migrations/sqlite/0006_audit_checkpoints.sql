-- Signed checkpoints of each org's audit chain: (org, seq, head, time)
-- signed by the HSM daemon's audit signing key (ECDSA P-256). Kept apart from
-- the rows they vouch for, so that rewriting or cutting rows shows against
-- them; exported to a write-once sink as well.
CREATE TABLE audit_checkpoints (
    org       TEXT    NOT NULL,
    seq       INTEGER NOT NULL CHECK (seq >= 1),
    head      BLOB    NOT NULL CHECK (length(head) = 32),
    time      INTEGER NOT NULL,
    key_id    TEXT    NOT NULL,
    signature BLOB    NOT NULL,
    PRIMARY KEY (org, seq)
) STRICT, WITHOUT ROWID;

-- Append-only like the rows (accidents, not attackers: the signatures are
-- what an attacker cannot forge).
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only: UPDATE refused');
END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only: DELETE refused');
END;
