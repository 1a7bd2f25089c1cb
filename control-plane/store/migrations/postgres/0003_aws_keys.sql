-- Keys that stay in AWS KMS: the ARNs they were added with, shown to admins
-- and checked periodically through the HSM daemon (which holds the same
-- reference under the key's handle). All three are NULL for every other key;
-- a backup or role ARN without a key ARN is reported as corruption
-- (src/sql.rs), not guessed at. The same columns as migrations/sqlite/0004.
ALTER TABLE keys ADD COLUMN aws_key_arn text;
ALTER TABLE keys ADD COLUMN aws_backup_key_arn text;
ALTER TABLE keys ADD COLUMN aws_role_arn text;

-- The provider health check reads every AWS key not removed, which are few
-- beside the generic default key's record in every org.
CREATE INDEX keys_aws ON keys (org, position) WHERE aws_key_arn IS NOT NULL;
