-- Each org's external id for AWS: sent on every STS AssumeRole of the org's
-- roles, and required by their trust policies (sts:ExternalId), so that the
-- service cannot be made to assume one org's role for another. Random,
-- created on first need, never changed.
CREATE TABLE aws_external_ids (
    org         text   COLLATE "C" NOT NULL PRIMARY KEY,
    external_id text   COLLATE "C" NOT NULL UNIQUE,
    created_at  bigint NOT NULL
);
