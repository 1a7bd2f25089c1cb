-- Signed checkpoints of each org's audit chain: (org, seq, head, time)
-- signed by the HSM daemon's audit signing key (ECDSA P-256). Kept apart from
-- the rows they vouch for, so that rewriting or cutting rows shows against
-- them; exported to a write-once sink as well.
CREATE TABLE audit_checkpoints (
    org       text   COLLATE "C" NOT NULL,
    seq       bigint NOT NULL CHECK (seq >= 1),
    head      bytea  NOT NULL CHECK (length(head) = 32),
    time      bigint NOT NULL,
    key_id    text   NOT NULL,
    signature bytea  NOT NULL,
    PRIMARY KEY (org, seq)
);

-- Append-only like the rows (accidents, not attackers: the signatures are
-- what an attacker cannot forge).
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
