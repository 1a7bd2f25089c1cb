//! Key and role ARNs, parsed once into types that can only hold a well-formed
//! value, so that everything past the parser can trust the region it reads.

use std::fmt;

/// The longest ARN accepted; KMS's own limit for a key identifier.
pub const MAX_ARN_LEN: usize = 2048;

/// Longest IAM role name (AWS's limit).
const MAX_ROLE_NAME_LEN: usize = 64;

/// Longest IAM path (AWS's limit).
const MAX_ROLE_PATH_LEN: usize = 512;

/// How much of a malformed fragment an error message quotes.
const QUOTE_LEN: usize = 64;

/// An AWS partition: a separate set of regions with its own endpoints and
/// accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Partition {
    /// The commercial regions.
    Aws,
    /// China (Beijing, Ningxia).
    AwsCn,
    /// AWS GovCloud (US).
    AwsUsGov,
}

impl Partition {
    /// The name as written in an ARN.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::AwsCn => "aws-cn",
            Self::AwsUsGov => "aws-us-gov",
        }
    }

    fn parse(text: &str) -> Result<Self, ArnError> {
        match text {
            "aws" => Ok(Self::Aws),
            "aws-cn" => Ok(Self::AwsCn),
            "aws-us-gov" => Ok(Self::AwsUsGov),
            _ => Err(ArnError::Partition(quote(text))),
        }
    }

    /// Whether `region` (already syntax-checked) belongs to this partition. A
    /// mismatch would send the call to an endpoint that has never heard of the key.
    fn contains(self, region: &str) -> bool {
        let cn = region.starts_with("cn-");
        let gov = region.starts_with("us-gov-");
        // The isolated partitions (us-iso-east-1, …), which this service does not reach.
        let iso = region.starts_with("us-iso");
        match self {
            Self::Aws => !cn && !gov && !iso,
            Self::AwsCn => cn,
            Self::AwsUsGov => gov,
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not an acceptable ARN. Each message is one line that names
/// what is wrong, written for the admin who pasted the ARN.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    /// Nothing given.
    #[error("ARN is empty")]
    Empty,
    /// Longer than [`MAX_ARN_LEN`].
    #[error("ARN is {0} bytes long; at most {MAX_ARN_LEN} are accepted")]
    TooLong(usize),
    /// Not of the form `arn:partition:service:region:account:resource`.
    #[error("{0} is not an ARN: expected arn:<partition>:<service>:<region>:<account>:<resource>")]
    Syntax(String),
    /// A partition other than aws, aws-cn, aws-us-gov.
    #[error("ARN partition {0} is unknown: expected aws, aws-cn or aws-us-gov")]
    Partition(String),
    /// The ARN is for another service.
    #[error("ARN service is {found}, but a {expected} ARN is required")]
    Service {
        /// The service this ARN must name.
        expected: &'static str,
        /// The service it names.
        found: String,
    },
    /// The region field is malformed.
    #[error("ARN region {0} is malformed: expected a region name such as us-east-1")]
    Region(String),
    /// A region of another partition.
    #[error("ARN region {region} is not in partition {partition}")]
    RegionPartition {
        /// The region in the ARN.
        region: String,
        /// The partition in the ARN.
        partition: Partition,
    },
    /// IAM is global: its ARNs have an empty region field.
    #[error("IAM role ARNs have no region, but this one names {0}")]
    RoleRegion(String),
    /// The account is not twelve digits.
    #[error("ARN account {0} is malformed: expected a 12-digit AWS account id")]
    Account(String),
    /// An external id STS would refuse.
    #[error("external id is malformed: expected 2 to 1224 letters, digits or any of +=,.@:/-_")]
    ExternalId,
    /// An external id given without a role to assume with it.
    #[error("an external id needs a role to assume: give role_arn too")]
    ExternalIdWithoutRole,
    /// A KMS alias where a key is required.
    #[error(
        "{0} is a KMS alias ARN; give the key ARN (arn:<partition>:kms:<region>:<account>:key/<key-id>) \
         instead, because an alias can be repointed to another key"
    )]
    Alias(String),
    /// A KMS ARN whose resource is not `key/…`.
    #[error("KMS ARN resource {0} is not a key: expected key/<key-id>")]
    KeyResource(String),
    /// The key id is neither a UUID nor a multi-region key id.
    #[error(
        "KMS key id {0} is malformed: expected a lower-case UUID \
         (1234abcd-12ab-34cd-56ef-1234567890ab) or a multi-region key id (mrk-<32 hex digits>)"
    )]
    KeyId(String),
    /// An IAM ARN whose resource is not `role/…`.
    #[error("IAM ARN resource {0} is not a role: expected role/<name> or role/<path>/<name>")]
    RoleResource(String),
    /// The role name breaks IAM's rules.
    #[error(
        "IAM role name {0} is malformed: 1 to {MAX_ROLE_NAME_LEN} characters of letters, digits \
         and +=,.@_-"
    )]
    RoleName(String),
    /// A key reference whose backup is its primary.
    #[error(
        "the backup key is the primary key; a backup must be another key, normally in another region"
    )]
    BackupIsPrimary,
    /// A key reference that spans partitions, where no one identity works.
    #[error("the {what} is in partition {found}, but the primary key is in {expected}")]
    PartitionMismatch {
        /// Which ARN: `backup key` or `role`.
        what: &'static str,
        /// Its partition.
        found: Partition,
        /// The primary key's partition.
        expected: Partition,
    },
    /// The role path breaks IAM's rules.
    #[error(
        "IAM role path {0} is malformed: at most {MAX_ROLE_PATH_LEN} characters, segments of \
         printable ASCII separated by single slashes"
    )]
    RolePath(String),
}

/// The six fields of an ARN, split at the first five colons (the resource may
/// hold colons of its own).
struct Fields<'a> {
    partition: Partition,
    region: &'a str,
    resource: &'a str,
}

impl<'a> Fields<'a> {
    fn split(text: &'a str, service: &'static str) -> Result<Self, ArnError> {
        if text.is_empty() {
            return Err(ArnError::Empty);
        }
        if text.len() > MAX_ARN_LEN {
            return Err(ArnError::TooLong(text.len()));
        }
        let mut parts = text.splitn(6, ':');
        let (
            Some("arn"),
            Some(partition),
            Some(found),
            Some(region),
            Some(account),
            Some(resource),
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return Err(ArnError::Syntax(quote(text)));
        };
        let partition = Partition::parse(partition)?;
        if found != service {
            return Err(ArnError::Service {
                expected: service,
                found: quote(found),
            });
        }
        if !is_account(account) {
            return Err(ArnError::Account(quote(account)));
        }
        Ok(Self {
            partition,
            region,
            resource,
        })
    }
}

/// The ARN of one KMS key: `arn:<partition>:kms:<region>:<account>:key/<key-id>`.
///
/// Never an alias: an alias can be repointed to another key by whoever controls
/// the account, and a KEK wrapped under one key must not silently move to
/// another.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyArn {
    /// `arn:<partition>:kms:<region>:<account>:key/<key-id>`, all ASCII.
    text: Box<str>,
    partition: Partition,
    /// Where the fields are in `text` follows from the partition and the
    /// region's length: the account has 12 digits, the key id runs to the end.
    region_len: u8,
}

impl KeyArn {
    /// Parses and validates a key ARN.
    pub fn parse(text: &str) -> Result<Self, ArnError> {
        let fields = Fields::split(text, "kms")?;
        check_region(fields.partition, fields.region)?;
        let key_id = match fields.resource.split_once('/') {
            Some(("key", id)) => id,
            Some(("alias", _)) => return Err(ArnError::Alias(quote(text))),
            _ => return Err(ArnError::KeyResource(quote(fields.resource))),
        };
        if !is_key_id(key_id) {
            return Err(ArnError::KeyId(quote(key_id)));
        }
        Ok(Self {
            text: text.into(),
            partition: fields.partition,
            // check_region bounded it to 32 bytes.
            region_len: u8::try_from(fields.region.len()).unwrap_or(u8::MAX),
        })
    }

    /// The ARN as AWS writes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The partition.
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// The region the key lives in, and so the region every call on it goes to.
    pub fn region(&self) -> &str {
        let start = self.region_start();
        self.slice(start, start + usize::from(self.region_len))
    }

    /// The account that owns the key.
    pub fn account(&self) -> &str {
        let start = self.account_start();
        self.slice(start, start + 12)
    }

    /// The key id: a UUID, or `mrk-…` for a multi-region key.
    pub fn key_id(&self) -> &str {
        self.slice(self.account_start() + 12 + ":key/".len(), self.text.len())
    }

    fn region_start(&self) -> usize {
        "arn:".len() + self.partition.as_str().len() + ":kms:".len()
    }

    fn account_start(&self) -> usize {
        self.region_start() + usize::from(self.region_len) + 1
    }

    /// A field of `text`, whose layout `parse` checked; empty rather than a
    /// panic should that ever be wrong.
    fn slice(&self, start: usize, end: usize) -> &str {
        self.text.get(start..end).unwrap_or_default()
    }
}

impl fmt::Display for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyArn({})", self.text)
    }
}

impl std::str::FromStr for KeyArn {
    type Err = ArnError;

    fn from_str(text: &str) -> Result<Self, ArnError> {
        Self::parse(text)
    }
}

/// The ARN of an IAM role: `arn:<partition>:iam::<account>:role/<path/name>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoleArn {
    text: String,
    partition: Partition,
}

impl RoleArn {
    /// Parses and validates a role ARN.
    pub fn parse(text: &str) -> Result<Self, ArnError> {
        let fields = Fields::split(text, "iam")?;
        if !fields.region.is_empty() {
            return Err(ArnError::RoleRegion(quote(fields.region)));
        }
        let Some(("role", path_and_name)) = fields.resource.split_once('/') else {
            return Err(ArnError::RoleResource(quote(fields.resource)));
        };
        // `role/a/b/name`: the path is `/a/b/`, the name is after the last slash.
        let (path, name) = match path_and_name.rsplit_once('/') {
            Some((path, name)) => (path, name),
            None => ("", path_and_name),
        };
        if !is_role_name(name) {
            return Err(ArnError::RoleName(quote(name)));
        }
        if !is_role_path(path) {
            return Err(ArnError::RolePath(quote(&format!("/{path}/"))));
        }
        Ok(Self {
            text: text.to_owned(),
            partition: fields.partition,
        })
    }

    /// The ARN as AWS writes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The partition.
    pub fn partition(&self) -> Partition {
        self.partition
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.text)
    }
}

impl std::str::FromStr for RoleArn {
    type Err = ArnError;

    fn from_str(text: &str) -> Result<Self, ArnError> {
        Self::parse(text)
    }
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `ap-southeast-2`: lower-case
/// words joined by hyphens, ending in a number.
fn check_region(partition: Partition, region: &str) -> Result<(), ArnError> {
    let words: Vec<&str> = region.split('-').collect();
    let well_formed = region.len() <= 32
        && words.len() >= 3
        && words.split_last().is_some_and(|(number, names)| {
            !number.is_empty()
                && number.len() <= 2
                && number.bytes().all(|b| b.is_ascii_digit())
                && names
                    .iter()
                    .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        });
    if !well_formed {
        return Err(ArnError::Region(quote(region)));
    }
    if !partition.contains(region) {
        return Err(ArnError::RegionPartition {
            region: region.to_owned(),
            partition,
        });
    }
    Ok(())
}

fn is_account(text: &str) -> bool {
    text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit())
}

fn is_key_id(text: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if let Some(rest) = text.strip_prefix("mrk-") {
        return rest.len() == 32 && hex(rest);
    }
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g))
}

fn is_role_name(name: &str) -> bool {
    (1..=MAX_ROLE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// The path between `role/` and the name, without its outer slashes (empty for
/// the root path `/`).
fn is_role_path(path: &str) -> bool {
    path.len() + 2 <= MAX_ROLE_PATH_LEN
        && (path.is_empty()
            || path.split('/').all(|segment| {
                !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_graphic())
            }))
}

/// A fragment of untrusted input for an error message: bounded, escaped, quoted,
/// so that a message stays one readable line whatever was pasted.
fn quote(text: &str) -> String {
    let mut shown: String = text.chars().take(QUOTE_LEN).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn a_key_arn_is_split_into_its_fields() {
        let arn = KeyArn::parse(KEY).expect("valid");
        assert_eq!(arn.partition(), Partition::Aws);
        assert_eq!(arn.region(), "us-east-1");
        assert_eq!(arn.account(), "123456789012");
        assert_eq!(arn.key_id(), "1234abcd-12ab-34cd-56ef-1234567890ab");
        assert_eq!(arn.to_string(), KEY);
    }

    #[test]
    fn other_partitions_and_multi_region_keys_are_accepted() {
        for text in [
            "arn:aws-cn:kms:cn-north-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:ap-southeast-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            let arn = KeyArn::parse(text).expect(text);
            assert_eq!(arn.as_str(), text);
        }
    }

    #[test]
    fn malformed_key_arns_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("arn:aws:kms:us-east-1:123456789012", "is not an ARN"),
            ("urn:aws:kms:us-east-1:123456789012:key/x", "is not an ARN"),
            (
                &KEY.replace("arn:aws:", "arn:aws-eu:"),
                "partition \"aws-eu\" is unknown",
            ),
            (&KEY.replace(":kms:", ":s3:"), "service is \"s3\""),
            (
                &KEY.replace("us-east-1", "US-EAST-1"),
                "region \"US-EAST-1\" is malformed",
            ),
            (
                &KEY.replace("us-east-1", "useast1"),
                "region \"useast1\" is malformed",
            ),
            (&KEY.replace("us-east-1", ""), "region \"\" is malformed"),
            (
                &KEY.replace("us-east-1", "cn-north-1"),
                "not in partition aws",
            ),
            (&KEY.replace("123456789012", "12345"), "12-digit"),
            (&KEY.replace("key/", "alias/"), "alias can be repointed"),
            (&KEY.replace("key/", "keys/"), "is not a key"),
            (&KEY.replace("1234abcd-", "1234ABCD-"), "key id \"1234ABCD"),
            (&format!("{KEY}0"), "malformed"),
        ];
        for (text, expected) in cases {
            let error = KeyArn::parse(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[test]
    fn overlong_input_is_refused_before_it_is_read() {
        let long = format!("{KEY}{}", "a".repeat(MAX_ARN_LEN));
        assert_eq!(KeyArn::parse(&long), Err(ArnError::TooLong(long.len())));
        assert_eq!(RoleArn::parse(&long), Err(ArnError::TooLong(long.len())));
    }

    #[test]
    fn error_messages_quote_a_bounded_escaped_fragment() {
        let error = KeyArn::parse(&format!("arn:{}\n:kms", "x".repeat(500)))
            .expect_err("bad")
            .to_string();
        assert!(error.len() < 200, "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn role_arns_with_and_without_path_are_accepted() {
        for text in [
            "arn:aws:iam::123456789012:role/cmk-hsm",
            "arn:aws:iam::123456789012:role/service/cmk/cmk-hsm",
            "arn:aws-us-gov:iam::123456789012:role/a+b=c,d.e@f_g-h",
        ] {
            let arn = RoleArn::parse(text).expect(text);
            assert_eq!(arn.to_string(), text);
        }
    }

    #[test]
    fn malformed_role_arns_are_refused_with_the_reason() {
        let cases = [
            (
                "arn:aws:iam:us-east-1:123456789012:role/x",
                "have no region",
            ),
            ("arn:aws:sts::123456789012:role/x", "service is \"sts\""),
            ("arn:aws:iam::123456789012:user/x", "is not a role"),
            ("arn:aws:iam::123456789012:role/", "role name \"\""),
            ("arn:aws:iam::123456789012:role/a b", "role name \"a b\""),
            ("arn:aws:iam::123456789012:role/a//b", "role path"),
            ("arn:aws:iam::1234567890123:role/x", "12-digit"),
        ];
        let long_name = format!("arn:aws:iam::123456789012:role/{}", "n".repeat(65));
        for (text, expected) in cases
            .iter()
            .copied()
            .chain([(long_name.as_str(), "role name")])
        {
            let error = RoleArn::parse(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    fn region() -> impl Strategy<Value = (Partition, String)> {
        prop_oneof![
            ("(us|eu|ap|sa|ca|me|af|il|mx)-(east|west|north|south|central|southeast)-[1-9]")
                .prop_map(|r| (Partition::Aws, r)),
            "cn-(north|northwest)-[1-9]".prop_map(|r| (Partition::AwsCn, r)),
            "us-gov-(east|west)-[1-9]".prop_map(|r| (Partition::AwsUsGov, r)),
        ]
    }

    proptest! {
        #[test]
        fn a_parsed_key_arn_round_trips(
            (partition, region) in region(),
            account in "[0-9]{12}",
            key_id in prop_oneof![
                "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                "mrk-[0-9a-f]{32}",
            ],
        ) {
            let text = format!("arn:{partition}:kms:{region}:{account}:key/{key_id}");
            let arn = KeyArn::parse(&text).expect("valid");
            prop_assert_eq!(arn.region(), region.as_str());
            prop_assert_eq!(arn.account(), account.as_str());
            prop_assert_eq!(arn.key_id(), key_id.as_str());
            prop_assert_eq!(KeyArn::parse(&arn.to_string()), Ok(arn));
        }

        #[test]
        fn a_parsed_role_arn_round_trips(
            (partition, _) in region(),
            account in "[0-9]{12}",
            path in "(/[a-z0-9!-.]{1,10}){0,3}",
            name in "[A-Za-z0-9+=,.@_-]{1,64}",
        ) {
            let text = format!("arn:{partition}:iam::{account}:role{path}/{name}");
            let arn = RoleArn::parse(&text).expect("valid");
            prop_assert_eq!(RoleArn::parse(&arn.to_string()), Ok(arn));
        }

        #[test]
        fn garbage_never_panics(text in "\\PC{0,300}") {
            let _ = KeyArn::parse(&text);
            let _ = RoleArn::parse(&text);
        }

        #[test]
        fn near_misses_never_panic(
            text in "arn:(aws|aws-cn|x)?:(kms|iam)?:[a-z0-9-]{0,20}:[0-9]{0,13}:(key|alias|role)?/?[a-z0-9/-]{0,40}",
        ) {
            let _ = KeyArn::parse(&text);
            let _ = RoleArn::parse(&text);
        }
    }
}
