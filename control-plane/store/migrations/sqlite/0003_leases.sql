-- Work that one replica at a time does — a rotation job, the timers — is
-- claimed with a lease: a row naming its holder until `expires_at`, renewed by
-- the holder while it works and free for another to take once it runs out
-- (a holder that died). See `Store::acquire_lease`.
CREATE TABLE leases (
    name       TEXT    NOT NULL PRIMARY KEY,
    holder     TEXT    NOT NULL,
    -- Milliseconds since the Unix epoch, by the database's clock, so that
    -- replicas' clocks need not agree.
    expires_at INTEGER NOT NULL
) STRICT;
